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
import os
from typing import Optional, Sequence

from detectron2.config import CfgNode as CN

from lrpet_dense.core import LRPETConfig

__all__ = ["add_lrpet_config", "lrpet_config", "lrpet_enabled", "register_toy_voc", "register_toy_voc_from_env"]

logger = logging.getLogger(__name__)

TOY_VOC_ENV = "LRPET_TOY_VOC"


_D = LRPETConfig()  # the defaults, written once in lrpet_dense.core.config


def add_lrpet_config(cfg: CN) -> None:
    """Add the ``cfg.LRPET`` subtree (LRPET low-rank training) to a detectron2 config, in place.

    Each key but ``ENABLED`` is the field of :class:`~lrpet_dense.core.LRPETConfig` of the same name
    in lower case (:func:`lrpet_config` maps them); the defaults are that class's. Only adds keys;
    the LRPET configs also set ``MODEL.META_ARCHITECTURE: "LRPETGeneralizedRCNN"``.

    Args:
        cfg: a detectron2 config from ``get_cfg()``.
    """
    _C = cfg
    _C.LRPET = CN()
    # Whether to project the selected convs during training (bool). False trains the plain model.
    _C.LRPET.ENABLED = False
    # One rank pruning ratio p in [0, 1): rank k = max(1, floor(full_rank * (1 - p))). None = 0.5,
    # unless TARGET_MACS_CUT is set (setting both is an error).
    _C.LRPET.RATIO = _D.ratio
    # Fraction in (0, 1) of the backbone's conv MACs (model.backbone: ResNet stem..res4 for C4, ResNet
    # + FPN for FPN) to remove; the core solves the ratio for it. None or 0 = off (use RATIO).
    _C.LRPET.TARGET_MACS_CUT = _D.target_macs_cut
    # Per-layer ratio overrides as a flat list [pattern, ratio, pattern, ratio, ...] (fnmatch
    # patterns over module names, '*' spans dots; first match wins), e.g. ["backbone.res4.*", 0.6].
    _C.LRPET.OVERRIDES = []
    # fnmatch patterns of convs to project. Empty = every trained conv of "backbone.*" (the ResNet;
    # in FPN models also the FPN's lateral/output convs) and, in C4 models, "roi_heads.res5.*".
    # Convs whose factorised form would not save MACs are not projected unless named here exactly.
    _C.LRPET.INCLUDE = list(_D.include)
    # fnmatch patterns of convs never to project (applied after INCLUDE).
    _C.LRPET.EXCLUDE = list(_D.exclude)
    # Whether convs frozen by MODEL.BACKBONE.FREEZE_AT (no gradient) are projected too (bool).
    # Default False: projecting a frozen layer is a one-shot truncation it cannot recover from.
    _C.LRPET.INCLUDE_FROZEN = _D.include_frozen
    # Project after every INTERVAL optimizer steps (int > 0), and always after the last step.
    _C.LRPET.INTERVAL = _D.interval
    # No projection before this many steps have been taken (int >= 0).
    _C.LRPET.BEGIN = _D.begin
    # Energy transfer: rescale kept singular values to keep the Frobenius norm (bool).
    _C.LRPET.ENERGY_TRANSFER = _D.energy_transfer
    # BN rectification: project the BN-folded weight, using running statistics (bool).
    _C.LRPET.BN_RECTIFICATION = _D.bn_rectification
    # Ridge lambda (>= 0) of the BN-rectified recovery W' = a / (a^2 + lambda) * M'.
    _C.LRPET.RIDGE = _D.ridge
    # Residual factor r in [0, 1] for the dropped singular values (0 = the paper's formula).
    _C.LRPET.RESIDUAL = _D.residual
    # When a projection fails (no layer is changed): "raise" stops training, "skip" logs it and trains on.
    _C.LRPET.ON_ERROR = _D.on_error
    # Input (H, W) of the dummy backbone forward that measures conv output sizes for the MAC plan.
    # (0, 0) = (INPUT.MIN_SIZE_TEST, INPUT.MIN_SIZE_TEST).
    _C.LRPET.PLAN_INPUT_SIZE = (0, 0)
    # "uniform" (one ratio for every layer, the paper's) or "energy" (per-layer ranks keeping the most
    # spectral energy per MAC removed, for TARGET_MACS_CUT).
    _C.LRPET.RANK_POLICY = _D.rank_policy
    # Round every rank down to a multiple of this (int >= 1; 8 or 16 suit SIMD widths / GPU tiles).
    _C.LRPET.RANK_MULTIPLE = _D.rank_multiple
    # Fraction in (0, 1) of the selected convs' measured latency to remove instead of a MAC cut (layers
    # whose factorised form is not measured faster stay dense). None or 0 = off.
    _C.LRPET.TARGET_LATENCY_CUT = _D.target_latency_cut
    # JSON file caching the per-layer latency table (measured on this device where missing or stale).
    _C.LRPET.LATENCY_TABLE = _D.latency_table
    # Steps (int >= 0) over which the projections' ranks shrink linearly from full rank to the plan's;
    # the final projection always uses the plan's. 0 = the plan's ranks from the first projection.
    _C.LRPET.RANK_WARMUP = _D.rank_warmup
    # After the final projection, recompute BN running statistics on this many training batches (int
    # >= 0; 0 = off), so the saved model's statistics belong to its final weights. Not used when
    # TEST.PRECISE_BN.ENABLED (detectron2's PreciseBN then does it); nothing to do with FrozenBN.
    _C.LRPET.PRECISE_BN_ITERS = _D.precise_bn_iters
    # Warn once, when training starts, when the first projection would keep less than this share of a
    # planned conv's spectral energy (its BN-folded weights at planning time), in [0, 1); 0.0 = off.
    _C.LRPET.WARN_ENERGY_BELOW = _D.warn_energy_below
    # Warn likewise when a planned conv's rank is below this (int >= 0); 0 = off.
    _C.LRPET.WARN_RANK_BELOW = _D.warn_rank_below


def _overrides(flat) -> dict:
    flat = list(flat)
    if len(flat) % 2:
        raise ValueError(f"cfg.LRPET.OVERRIDES must be a flat list [pattern, ratio, pattern, ratio, ...], got {flat!r}")
    for pattern in flat[::2]:
        if not isinstance(pattern, str):
            raise ValueError(f"cfg.LRPET.OVERRIDES: pattern must be a string, got {pattern!r}")
    return dict(zip(flat[::2], flat[1::2]))


def lrpet_config(cfg) -> LRPETConfig:
    """The LRPET options of a detectron2 config as an :class:`~lrpet_dense.core.LRPETConfig` (validated;
    errors name the key as the config spells it).

    A yacs config: ``cfg.LRPET.<KEY>`` is field ``<key>``; ``OVERRIDES`` is a flat ``[pattern, ratio, ...]``
    list, ``PLAN_INPUT_SIZE`` ``(0, 0)`` means None; ``ENABLED`` is detectron2's switch, not an option.
    A LazyConfig: ``cfg.lrpet`` is a dict of the fields (``lrpet = dict(target_macs_cut=0.5, interval=500)``;
    an ``enabled`` entry is the switch, :func:`lrpet_enabled`).

    Raises:
        ValueError: a key is out of range or of the wrong type, or the config has no LRPET options.
    """
    if not isinstance(cfg, CN):
        return _lazy_lrpet_config(cfg)
    if "LRPET" not in cfg:
        raise ValueError("the config has no LRPET keys: call lrpet_dense.detectron2.add_lrpet_config(cfg) after "
                         "get_cfg(), before merging the config file")
    c = cfg.LRPET
    options = {name: c[name.upper()] for name in LRPETConfig.field_names() if name.upper() in c}
    options["overrides"] = _overrides(c.OVERRIDES)
    options["include"], options["exclude"] = list(c.INCLUDE), list(c.EXCLUDE)
    size = tuple(int(v) for v in c.PLAN_INPUT_SIZE)
    options["plan_input_size"] = None if size == (0, 0) else size
    if not isinstance(c.ENABLED, bool):
        raise ValueError(f"cfg.LRPET.ENABLED must be True or False, got {c.ENABLED!r}")
    return LRPETConfig.from_kwargs(options, display=lambda name: f"cfg.LRPET.{name.upper()}",
                                   hint="; fix it in the config file or with 'LRPET.KEY VALUE' on the command line")


def lrpet_enabled(cfg) -> bool:
    """Whether a detectron2 config trains with LRPET: yacs ``cfg.LRPET.ENABLED``; a LazyConfig has an ``lrpet``
    entry whose ``enabled`` is not False (``lrpet.enabled=False`` on the command line turns it off)."""
    if isinstance(cfg, CN):
        enabled = cfg.LRPET.ENABLED
    else:
        options = cfg.get("lrpet") if hasattr(cfg, "get") else None
        enabled = options is not None and options.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"LRPET's 'enabled' switch must be True or False, got {enabled!r}")
    return enabled


def _lazy_lrpet_config(cfg) -> LRPETConfig:
    from omegaconf import DictConfig, OmegaConf

    options = cfg.get("lrpet") if hasattr(cfg, "get") else None
    if options is None:
        raise ValueError("the LazyConfig has no 'lrpet' entry: add lrpet = dict(...) with LRPETConfig's fields, "
                         "e.g. lrpet = dict(target_macs_cut=0.5, interval=500)")
    if isinstance(options, DictConfig):
        options = OmegaConf.to_container(options, resolve=True)
    if not isinstance(options, dict):
        raise ValueError(f"the LazyConfig's 'lrpet' must be a dict of LRPETConfig's fields, got {options!r}")
    options = {k: v for k, v in options.items() if k != "enabled"}  # detectron2's switch, as LRPET.ENABLED
    return LRPETConfig.from_kwargs(options, display=lambda name: f"lrpet.{name}",
                                   hint="; fix it in the config file or with 'lrpet.KEY=VALUE' on the command line")


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
