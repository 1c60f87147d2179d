"""Compressed (factorised) detectron2 checkpoints: write them, check them, load them through detectron2's paths.

A compressed checkpoint is a ``.pth`` file loadable with ``torch.load(weights_only=True)``::

    {"model": state dict of the factorised model (+ "_lrpet_plan": the plan as UTF-8 JSON bytes, uint8),
     "lrpet_plan": RankPlan.to_dict() (plain data), "lrpet_factorized": [names of factorised convs], "meta": {...}}

Loading does not depend on the model type: :func:`~lrpet_dense.core.enable_compressed_loading_`
registers a ``load_state_dict`` pre-hook that reads the plan carried in the state dict and installs
the factorised convs before the weights are copied. This package's trainer and tools enable it on
every model they build (:mod:`lrpet_dense.detectron2.training`), so a compressed checkpoint loads
whatever ``MODEL.META_ARCHITECTURE`` says; the LRPET configs also set ``LRPETGeneralizedRCNN``
(:mod:`lrpet_dense.detectron2.model`), which has the hook on, so that detectron2's own
``DefaultPredictor`` loads them too. (A stock ``GeneralizedRCNN`` built outside this project's code
cannot know about factorised layers: detectron2 only warns about unexpected keys there.) A plan that
does not fit the model, a factorised state dict without a plan, or a dense checkpoint loaded into an
already factorised model is a ``ValueError`` naming the problem.

The functions here are the detectron2 :data:`~lrpet_dense.detectron2.adapter.ADAPTER`'s, written once
in :class:`lrpet_dense.core.adapter.Adapter` for every framework: :func:`compress_model_` checks what it
produces (every planned conv already of its planned rank; the pre-NMS outputs of :func:`output_tensors`
equal to the dense model's in float64), :func:`to_inference_` folds the BatchNorms (checked the same
way), :func:`save_compressed` / :func:`plan_from_checkpoint` write and read the layout above;
:func:`load_model` builds a config's model and loads a checkpoint strictly; :func:`export_onnx` is
:mod:`lrpet_dense.detectron2.onnx`'s.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

from torch import nn

from detectron2.checkpoint import DetectionCheckpointer

from lrpet_dense.core import RankPlan, enable_compressed_loading_
from lrpet_dense.core.factorize import model_plan
from lrpet_dense.io import load_checkpoint_safe

from .adapter import ADAPTER
from .model import LRPETGeneralizedRCNN, output_tensors
from .pairing import unwrap_model

__all__ = [
    "LRPETGeneralizedRCNN", "CompressedAwareCheckpointer", "load_model", "plan_from_checkpoint", "compressed_plan_of",
    "compress_model_", "save_compressed", "count_complexity", "output_tensors", "to_inference_", "export_onnx",
]

logger = logging.getLogger(__name__)

compress_model_ = ADAPTER.compress_model_
to_inference_ = ADAPTER.to_inference_
save_compressed = ADAPTER.save_compressed
plan_from_checkpoint = ADAPTER.plan_from_checkpoint
count_complexity = ADAPTER.count_complexity
export_onnx = ADAPTER.export_onnx


def load_model(cfg, path: Optional[str] = None, *, device: Optional[str] = None,
               dense_only: bool = False) -> Tuple[nn.Module, dict]:
    """Build ``cfg``'s model (any meta architecture) and load a dense or compressed ``.pth`` checkpoint strictly.

    The checkpoint is read with ``torch.load(weights_only=True)`` (errors name the file); a compressed
    one first builds its factorised convs (:func:`~lrpet_dense.core.enable_compressed_loading_`); any
    missing, unexpected or mis-shaped key is an error (detectron2's own checkpointer only warns).

    Args:
        cfg: a detectron2 yacs config (``MODEL.WEIGHTS`` is ignored), or a LazyConfig (its ``model`` is
            instantiated; ``train.init_checkpoint`` is ignored).
        path: the checkpoint, or None for a freshly initialised model.
        device: where the model goes. Defaults to None: ``cfg.MODEL.DEVICE`` (LazyConfig: ``train.device``,
            else CPU).
        dense_only: refuse a compressed checkpoint (for tools that need dense weights). Defaults to False.

    Returns:
        ``(model, checkpoint)``: the model in eval mode and the whole checkpoint dict (``{}`` without one).
    """
    from detectron2.config import CfgNode

    ckpt = load_checkpoint_safe(path) if path is not None else {}
    if dense_only and ADAPTER.is_compressed(ckpt):
        raise ValueError(f"checkpoint {path!r} is already compressed (factorised); give the dense training "
                         "checkpoint it was made from (e.g. model_final.pth)")
    if isinstance(cfg, CfgNode):
        from detectron2.modeling import build_model

        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ""
        if device is not None:
            cfg.MODEL.DEVICE = device
        cfg.freeze()
        model = build_model(cfg)
    else:
        from detectron2.config import instantiate

        model = instantiate(cfg.model).to(device or (cfg.get("train") or {}).get("device", "cpu"))
    if path is not None:
        model = ADAPTER.load_state_(model, ckpt, path)
    return model.eval(), ckpt


class CompressedAwareCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` that loads compressed checkpoints into any detector strictly.

    Enables :func:`~lrpet_dense.core.enable_compressed_loading_` on the model, and when what was
    loaded is compressed (the model is now factorised), any missing or unexpected key is an error
    instead of detectron2's warning: a partly loaded factorised model would evaluate silently wrong.
    Dense checkpoints (``.pth``, model-zoo ``.pkl``) load exactly as with ``DetectionCheckpointer``.

    With ``for_training`` (what :class:`~lrpet_dense.detectron2.LRPETTrainer` uses), a model built dense
    that a loaded checkpoint factorised is an error: the optimizer, built before, does not hold the
    factorised layers (build the model from the compressed ``MODEL.WEIGHTS`` instead:
    :func:`~lrpet_dense.detectron2.prepare_model_`).
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *, for_training: bool = False, **kwargs):
        enable_compressed_loading_(unwrap_model(model))
        self.for_training = for_training
        super().__init__(model, save_dir, **kwargs)

    def _load_model(self, checkpoint):
        built_dense = model_plan(unwrap_model(self.model)) is None
        incompatible = super()._load_model(checkpoint)
        if model_plan(unwrap_model(self.model)) is not None:
            if self.for_training and built_dense:
                raise ValueError("the checkpoint loaded for training is compressed (factorised), but the model was "
                                 "built dense, so the optimizer does not hold the factorised layers; give the "
                                 "compressed checkpoint as MODEL.WEIGHTS / train.init_checkpoint and build the model "
                                 "with lrpet_dense.detectron2.prepare_model_ (it is then factorised before the "
                                 "optimizer), or train from a dense checkpoint")
            problems = list(incompatible.missing_keys) + list(incompatible.unexpected_keys)
            problems += [k for k, *_ in incompatible.incorrect_shapes]
            if problems:
                raise ValueError(f"the compressed checkpoint did not load completely into the factorised model: "
                                 f"{len(problems)} missing, unexpected or mis-shaped keys, e.g. {problems[:4]}")
        return incompatible


def compressed_plan_of(weights: str) -> Optional[RankPlan]:
    """The plan of a local compressed checkpoint file (``MODEL.WEIGHTS``), or None for anything else
    (an empty string, a URL, a model-zoo ``.pkl``, a dense checkpoint)."""
    if not weights or "://" in weights or not weights.endswith((".pth", ".pt")) or not os.path.isfile(weights):
        return None
    return ADAPTER.compressed_plan_of(weights)
