"""Factorised mmseg models for inference, and their checkpoints.

A compressed checkpoint is an mmengine-style ``{'meta', 'state_dict'}`` file, loadable with
``torch.load(..., weights_only=True)``, that carries its rank plan three times:

* as the ``_lrpet_plan`` entry of the state dict (UTF-8 JSON in a uint8 tensor) and in the state
  dict's root metadata (``state_dict._metadata['']['lrpet_plan']``), which a ``load_state_dict``
  pre-hook receives (:func:`~lrpet_dense.core.enable_compressed_loading_`);
* in ``checkpoint['meta']['lrpet_plan']``, for people and tools.

Loading does not depend on the model type: the pre-hook builds the factorised convs of the plan
before the weights are copied. :class:`LRPETEncoderDecoder` (:mod:`lrpet_dense.mmseg.model`,
registered in mmseg's ``MODELS``) always has it, so ``mmseg.apis.init_model`` loads compressed
checkpoints; the shipped configs set it, and a config naming it cannot be built without
lrpet_dense. A stock ``EncoderDecoder`` has it in every process that imported ``lrpet_dense.mmseg``
(a config's ``custom_imports``; :func:`lrpet_dense.openmmlab.enable_for_stock_models`) and under
:class:`LRPETHook` (``tools/test.py``, ``load_from``). Where nothing of lrpet_dense is imported,
mmengine only warns about the keys it could not load: the first unexpected key it prints is the
compressed checkpoint's note (:data:`lrpet_dense.openmmlab.NOTE_KEY_FORMAT`) naming the model type
to set. This project's tools use :func:`load_model`. A factorised model writes its plan into its
own state dict's metadata, so checkpoints saved from it (e.g. when fine-tuning) stay loadable.

:func:`compress_model_` checks what it produces: every planned conv must be of its planned rank, and
the factorised model's logits (``mode='tensor'``) must equal the dense model's in float64
(:func:`~lrpet_dense.core.compare_outputs`); otherwise the model is left unchanged. These functions
are the mmseg :data:`~lrpet_dense.mmseg.adapter.ADAPTER`'s, written once in
:class:`lrpet_dense.core.adapter.Adapter` for every framework; :func:`export_onnx` is
:mod:`lrpet_dense.mmseg.onnx`'s.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

from torch import nn

from .adapter import ADAPTER, CHECKPOINT_KEY, PLAN_KEY, output_tensors
from .model import LRPETEncoderDecoder

__all__ = [
    "LRPETEncoderDecoder", "load_model", "plan_from_checkpoint", "compressed_plan_of", "is_compressed",
    "compress_model_", "save_compressed", "count_complexity", "output_tensors", "to_inference_", "export_onnx",
    "CHECKPOINT_KEY", "PLAN_KEY",
]

logger = logging.getLogger(__name__)

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
    """Build ``cfg``'s segmentor (any model type) as ``mmseg.apis.init_model`` does and load a dense or
    compressed checkpoint strictly (:meth:`lrpet_dense.openmmlab.OpenMMLabAdapter.load_model`).

    The checkpoint is read with ``torch.load(weights_only=True)`` (errors name the file and any
    offending class), a compressed one first builds its factorised convs, and any missing or
    unexpected key is an error (mmengine only warns).

    Args:
        cfg: an mmengine ``Config`` (not modified).
        path: the checkpoint, or None for a freshly initialised model.
        device: where the model goes. Defaults to None: CPU (mmseg configs name no device).
        dense_only: refuse a compressed checkpoint. Defaults to False.

    Returns:
        ``(model, checkpoint)``: the model in eval mode, and the checkpoint dict (``{}`` without one).
    """
    return ADAPTER.load_model(cfg, path, device=device, dense_only=dense_only)
