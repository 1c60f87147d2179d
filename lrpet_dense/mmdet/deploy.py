"""Factorised mmdet detectors for inference, and their checkpoints.

A compressed checkpoint is an mmengine-style ``{'meta', 'state_dict'}`` file, loadable with
``torch.load(..., weights_only=True)``, the same as mmseg's (:mod:`lrpet_dense.mmseg.deploy`): its
plan travels as the ``_lrpet_plan`` entry and the root metadata of the state dict (which the
loading pre-hook reads) and as ``meta['lrpet_plan']``; ``meta['lrpet_model_type']`` names the LRPET
model type that loads it, and so does the note that heads the state dict.

Loading it:

* **the LRPET model type** (``model=dict(type='LRPETFasterRCNN')``, ``LRPETRetinaNet``; the shipped
  configs set it): ``mmdet.apis.init_detector``, mmdet's ``tools/test.py`` and ``load_from`` build its
  factorised convs first. Set it in every config that loads compressed checkpoints: a config naming
  it cannot be built without lrpet_dense, so it can never load one into dense layers.
* **a stock type** (``FasterRCNN``) loads it the same way in any process that imported
  ``lrpet_dense.mmdet`` (a config's ``custom_imports`` does) and under the ``LRPETHook``; where
  nothing of lrpet_dense is imported, mmengine's loader leaves the factorised convs' dense layers
  as initialised and only warns: the first unexpected key it prints is the checkpoint's note,
  "LRPET COMPRESSED CHECKPOINT - build the model with type='LRPETFasterRCNN' ...".
* this project's tools use :func:`load_model` (strict: any missing or unexpected key is an error).

:func:`compress_model_` checks what it produces: every planned conv must be of its planned rank, and
the factorised detector's raw outputs (features, RPN / dense head and ROI head outputs before NMS,
:func:`~lrpet_dense.mmdet.model.raw_outputs`) must equal the dense detector's in float64; otherwise
the model is left unchanged. These functions are the mmdet :data:`~lrpet_dense.mmdet.adapter.ADAPTER`'s,
written once in :class:`lrpet_dense.core.adapter.Adapter`.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

from .adapter import ADAPTER
from .model import LRPETFasterRCNN, LRPETRetinaNet, output_tensors

__all__ = [
    "LRPETFasterRCNN", "LRPETRetinaNet", "load_model", "plan_from_checkpoint", "compressed_plan_of", "is_compressed",
    "compress_model_", "save_compressed", "count_complexity", "output_tensors", "to_inference_", "export_onnx",
]

compress_model_ = ADAPTER.compress_model_
to_inference_ = ADAPTER.to_inference_
save_compressed = ADAPTER.save_compressed
plan_from_checkpoint = ADAPTER.plan_from_checkpoint
compressed_plan_of = ADAPTER.compressed_plan_of
is_compressed = ADAPTER.is_compressed
count_complexity = ADAPTER.count_complexity
export_onnx = ADAPTER.export_onnx


def load_model(cfg, path: Optional[str] = None, *, device: Optional[str] = None,
               dense_only: bool = False) -> Tuple[nn.Module, dict]:
    """Build ``cfg``'s detector (any model type) as ``mmdet.apis.init_detector`` does and load a dense or
    compressed checkpoint strictly (:meth:`lrpet_dense.openmmlab.OpenMMLabAdapter.load_model`).

    The checkpoint is read with ``torch.load(weights_only=True)`` (errors name the file and any
    offending class), a compressed one first builds its factorised convs, and any missing or
    unexpected key is an error (mmengine only warns); the checkpoint's ``dataset_meta`` (class names)
    becomes the model's.

    Args:
        cfg: an mmengine ``Config`` (not modified).
        path: the checkpoint, or None for a freshly initialised model.
        device: where the model goes. Defaults to None: CPU.
        dense_only: refuse a compressed checkpoint. Defaults to False.

    Returns:
        ``(model, checkpoint)``: the model in eval mode, and the checkpoint dict (``{}`` without one).
    """
    return ADAPTER.load_model(cfg, path, device=device, dense_only=dense_only)
