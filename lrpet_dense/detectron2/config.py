"""The ``cfg.LRPET`` config subtree, and the toy VOC dataset names used by the toy config.

Usage (as in ``tools/train_det.py``)::

    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file("configs/faster_rcnn_lrpet.yaml")

Toy dataset: ``configs/toy/faster_rcnn_lrpet_toy.yaml`` trains on ``voc_toy_2007_train`` and tests on
``voc_toy_2007_test``. They are registered with detectron2's own :func:`register_pascal_voc` by
:func:`register_toy_voc`, which ``tools/train_det.py`` calls when the environment variable
``LRPET_TOY_VOC`` names a ``VOCdevkit`` folder (as written by
``python -m lrpet_dense.data.toy_voc OUT_DIR``: ``LRPET_TOY_VOC=OUT_DIR/VOCdevkit``), in the same way
detectron2 registers ``voc_2007_*`` under ``DETECTRON2_DATASETS``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence

from detectron2.config import CfgNode as CN

__all__ = ["add_lrpet_config", "check_lrpet_config", "overrides_from_cfg", "register_toy_voc",
           "register_toy_voc_from_env", "TOY_VOC_ENV"]

logger = logging.getLogger(__name__)

TOY_VOC_ENV = "LRPET_TOY_VOC"


def add_lrpet_config(cfg: CN) -> None:
    """Add the ``cfg.LRPET`` subtree (LRPET low-rank training) to a detectron2 config, in place.

    Only adds keys; the LRPET configs also set ``MODEL.META_ARCHITECTURE: "LRPETGeneralizedRCNN"``
    so that compressed checkpoints load (see :mod:`lrpet_dense.detectron2.deploy`).

    Args:
        cfg: a detectron2 config from ``get_cfg()``.
    """
    _C = cfg
    _C.LRPET = CN()
    # Whether to project the selected convs during training (bool). False trains the plain model.
    _C.LRPET.ENABLED = False
    # One rank pruning ratio p in [0, 1): rank k = max(1, floor(full_rank * (1 - p))). Used when
    # TARGET_MACS_CUT is 0.
    _C.LRPET.RATIO = 0.5
    # Fraction in (0, 1) of the backbone's conv MACs (model.backbone: ResNet stem..res4 for C4, ResNet
    # + FPN for FPN) to remove; the core solves one ratio p for it (overrides keep their ratios).
    # 0 disables the solver and uses RATIO.
    _C.LRPET.TARGET_MACS_CUT = 0.0
    # Per-layer ratio overrides as a flat list [pattern, ratio, pattern, ratio, ...] (fnmatch
    # patterns over module names, '*' spans dots; first match wins), e.g. ["backbone.res4.*", 0.6].
    _C.LRPET.OVERRIDES = []
    # fnmatch patterns of convs to project. Empty = every trained conv of "backbone.*" (the ResNet;
    # in FPN models also the FPN's lateral/output convs) and, in C4 models, "roi_heads.res5.*".
    # Convs whose factorised form would not save MACs are not projected unless named here exactly.
    _C.LRPET.INCLUDE = []
    # fnmatch patterns of convs never to project (applied after INCLUDE).
    _C.LRPET.EXCLUDE = []
    # Whether convs frozen by MODEL.BACKBONE.FREEZE_AT (no gradient) are projected too (bool).
    # Default False: projecting a frozen layer is a one-shot truncation it cannot recover from.
    _C.LRPET.INCLUDE_FROZEN = False
    # Project after every INTERVAL optimizer steps (int > 0), and always after the last step.
    _C.LRPET.INTERVAL = 500
    # No projection before this many steps have been taken (int >= 0).
    _C.LRPET.BEGIN = 0
    # Energy transfer: rescale kept singular values to keep the Frobenius norm (bool).
    _C.LRPET.ENERGY_TRANSFER = True
    # BN rectification: project the BN-folded weight, using running statistics (bool).
    _C.LRPET.BN_RECTIFICATION = True
    # Ridge lambda (>= 0) of the BN-rectified recovery W' = a / (a^2 + lambda) * M'.
    _C.LRPET.RIDGE = 1e-5
    # Residual factor r in [0, 1] for the dropped singular values (0 = the paper's formula).
    _C.LRPET.RESIDUAL = 0.0
    # When a projection fails (no layer is changed): "raise" stops training, "skip" logs it and trains on.
    _C.LRPET.ON_ERROR = "raise"
    # Input (H, W) of the dummy backbone forward that measures conv output sizes for the MAC plan.
    # (0, 0) = (INPUT.MIN_SIZE_TEST, INPUT.MIN_SIZE_TEST).
    _C.LRPET.PLAN_INPUT_SIZE = (0, 0)


def _number(value, key: str, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"cfg.LRPET.{key} must be {allowed}, got {value!r}; fix it in the config file or with "
                         f"'LRPET.{key} VALUE' on the command line")


def check_lrpet_config(cfg: CN) -> None:
    """Check every ``cfg.LRPET`` key; the error names the key, the bad value and the allowed values.

    Called by :meth:`~lrpet_dense.detectron2.LRPETHook.from_config`, i.e. when the trainer is built,
    before any weight is loaded or changed.

    Raises:
        ValueError: a key is out of range or of the wrong type.
    """
    c = cfg.LRPET
    _number(c.RATIO, "RATIO", "a rank pruning ratio in [0, 1)", lambda v: 0 <= v < 1)
    _number(c.TARGET_MACS_CUT, "TARGET_MACS_CUT", "0 (use RATIO) or a fraction of the backbone MACs in (0, 1)",
            lambda v: 0 <= v < 1)
    for key in ("INTERVAL", "BEGIN"):
        value = c[key]
        low = 1 if key == "INTERVAL" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"cfg.LRPET.{key} must be an integer >= {low} "
                             f"({'steps between projections' if low else 'steps before the first projection'}), "
                             f"got {value!r}")
    _number(c.RIDGE, "RIDGE", "a ridge lambda >= 0 (default 1e-5)", lambda v: v >= 0)
    _number(c.RESIDUAL, "RESIDUAL", "a residual factor in [0, 1] (default 0)", lambda v: 0 <= v <= 1)
    for key in ("ENABLED", "ENERGY_TRANSFER", "BN_RECTIFICATION", "INCLUDE_FROZEN"):
        if not isinstance(c[key], bool):
            raise ValueError(f"cfg.LRPET.{key} must be True or False, got {c[key]!r}")
    if c.ON_ERROR not in ("raise", "skip"):
        raise ValueError(f"cfg.LRPET.ON_ERROR must be 'raise' (stop training) or 'skip' (log and train on), "
                         f"got {c.ON_ERROR!r}")
    for key in ("INCLUDE", "EXCLUDE"):
        patterns = c[key]
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"cfg.LRPET.{key} must be a list of non-empty fnmatch patterns, got {patterns!r}")
    for pattern, ratio in overrides_from_cfg(cfg).items():
        _number(ratio, f"OVERRIDES[{pattern!r}]", "a rank pruning ratio in [0, 1)", lambda v: 0 <= v < 1)


def overrides_from_cfg(cfg: CN) -> dict:
    """``cfg.LRPET.OVERRIDES`` (flat ``[pattern, ratio, ...]`` list) as ``{pattern: ratio}``."""
    flat = list(cfg.LRPET.OVERRIDES)
    if len(flat) % 2:
        raise ValueError(f"LRPET.OVERRIDES must be a flat list [pattern, ratio, pattern, ratio, ...], got {flat!r}")
    out = {}
    for pattern, ratio in zip(flat[::2], flat[1::2]):
        if not isinstance(pattern, str):
            raise ValueError(f"LRPET.OVERRIDES: pattern must be a string, got {pattern!r}")
        out[pattern] = float(ratio)
    return out


def register_toy_voc(devkit: str, prefix: str = "voc_toy_2007", class_names: Optional[Sequence[str]] = None) -> None:
    """Register ``{prefix}_{train,val,trainval,test}`` for ``devkit/VOC2007`` with detectron2's VOC loader.

    Idempotent: names already registered are left as they are.

    Args:
        devkit: a ``VOCdevkit`` folder holding ``VOC2007`` (e.g. from :func:`lrpet_dense.data.toy_voc.make_toy_voc`).
        prefix: dataset name prefix. Defaults to ``"voc_toy_2007"``.
        class_names: the dataset's classes (label order). Defaults to None: the 20 VOC classes.
            ``PascalVOCDetectionEvaluator`` averages AP over these classes, so with the 20 VOC
            classes the toy set's 3 classes can reach at most 15 AP50; ``voc_toy3_2007_*`` (the
            toy classes only, :data:`~lrpet_dense.data.toy_voc.TOY_CLASSES`) is the meaningful score.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_pascal_voc

    dirname = os.path.join(devkit, "VOC2007")
    if not os.path.isdir(dirname):
        raise FileNotFoundError(f"{dirname!r} does not exist: {TOY_VOC_ENV} / devkit must name a VOCdevkit folder")
    for split in ("train", "val", "trainval", "test"):
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue
        if class_names is None:
            register_pascal_voc(name, dirname, split, 2007)
        else:
            register_pascal_voc(name, dirname, split, 2007, class_names=tuple(class_names))
        MetadataCatalog.get(name).evaluator_type = "pascal_voc"


def register_toy_voc_from_env() -> Optional[str]:
    """On ``$LRPET_TOY_VOC``, register ``voc_toy_2007_*`` (20 VOC classes) and ``voc_toy3_2007_*``
    (the 3 toy classes, for a 3-class model such as the quickstart's); return the folder or None."""
    devkit = os.environ.get(TOY_VOC_ENV)
    if devkit:
        from lrpet_dense.data.toy_voc import TOY_CLASSES

        register_toy_voc(devkit)
        register_toy_voc(devkit, "voc_toy3_2007", TOY_CLASSES)
        logger.info("registered toy VOC datasets voc_toy_2007_* and voc_toy3_2007_* from %s", devkit)
    return devkit or None
