"""Factorised mmseg models for inference, and their checkpoints.

A compressed checkpoint is an mmengine-style ``{'meta', 'state_dict'}`` file, loadable with
``torch.load(..., weights_only=True)``, that carries its rank plan three times:

* as the ``_lrpet_plan`` entry of the state dict (UTF-8 JSON in a uint8 tensor) and in the state
  dict's root metadata (``state_dict._metadata['']['lrpet_plan']``), which a ``load_state_dict``
  pre-hook receives (:func:`~lrpet_dense.core.enable_compressed_loading_`);
* in ``checkpoint['meta']['lrpet_plan']``, for people and tools.

Loading does not depend on the model type: the pre-hook builds the factorised convs of the plan
before the weights are copied. :class:`LRPETHook` enables it on the runner's model in ``before_run``,
so a config with the hook (``custom_hooks``) loads compressed checkpoints with mmseg's own
``tools/test.py`` and ``load_from`` even with the stock ``EncoderDecoder`` type; this project's
tools use :func:`load_model`. :class:`LRPETEncoderDecoder` (:mod:`lrpet_dense.mmseg.model`, registered
in mmseg's ``MODELS``) is an
``EncoderDecoder`` with the pre-hook always on, so ``mmseg.apis.init_model`` loads them too. (A stock
``EncoderDecoder`` outside the runner and these tools cannot know about factorised layers: mmengine
only warns about unexpected keys there.) A factorised model writes its plan into its own state
dict's metadata, so checkpoints saved from it (e.g. when fine-tuning) stay loadable.

:func:`compress_model_` checks what it produces: every planned conv must be of its planned rank, and
the factorised model's logits (``mode='tensor'``) must equal the dense model's in float64
(:func:`~lrpet_dense.core.compare_outputs`); otherwise the model is left unchanged. These functions
are the mmseg :data:`~lrpet_dense.mmseg.adapter.ADAPTER`'s, written once in
:class:`lrpet_dense.core.adapter.Adapter` for every framework; :func:`export_onnx` is
:mod:`lrpet_dense.mmseg.onnx`'s.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Optional, Tuple

from torch import nn

from lrpet_dense.io import load_checkpoint_safe

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
    """Build ``cfg``'s segmentor (any model type) and load a dense or compressed checkpoint strictly.

    Like ``mmseg.apis.init_model``, but the checkpoint is read with ``torch.load(weights_only=True)``
    (errors name the file and any offending class), a compressed one first builds its factorised
    convs, and any missing or unexpected key is an error (mmengine only warns).

    Args:
        cfg: an mmengine ``Config`` (not modified).
        path: the checkpoint, or None for a freshly initialised model.
        device: where the model goes. Defaults to None: CPU (mmseg configs name no device).
        dense_only: refuse a compressed checkpoint. Defaults to False.

    Returns:
        ``(model, checkpoint)``: the model in eval mode, and the checkpoint dict (``{}`` without one).
    """
    from mmseg.apis import init_model

    device = device or "cpu"
    ckpt: Dict[str, Any] = {}
    if path is not None:
        ckpt = load_checkpoint_safe(path)
        if dense_only and ADAPTER.is_compressed(ckpt):
            raise ValueError(f"checkpoint {path!r} is already compressed (factorised); give the dense training "
                             "checkpoint it was made from (e.g. iter_N.pth)")
    model = init_model(copy.deepcopy(cfg), None, device=device)
    if path is not None:
        ADAPTER.load_state_(model, ckpt, path)
        meta = ckpt.get("meta") or {}
        if meta.get("dataset_meta"):
            model.dataset_meta = meta["dataset_meta"]
    return model.to(device).eval(), ckpt
