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
tools use :func:`load_model`. :class:`LRPETEncoderDecoder` (registered in mmseg's ``MODELS``) is an
``EncoderDecoder`` with the pre-hook always on, so ``mmseg.apis.init_model`` loads them too. (A stock
``EncoderDecoder`` outside the runner and these tools cannot know about factorised layers: mmengine
only warns about unexpected keys there.) A factorised model writes its plan into its own state
dict's metadata, so checkpoints saved from it (e.g. when fine-tuning) stay loadable.

:func:`compress_model_` checks what it produces: every planned conv must be of its planned rank, and
the factorised model's logits (``mode='tensor'``) must equal the dense model's in float64
(:func:`~lrpet_dense.core.compare_outputs`); otherwise the model is left unchanged.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from torch import nn

from lrpet_dense.core import LRPETConfig, RankPlan, enable_compressed_loading_, factorize_
from lrpet_dense.core.factorize import (PLAN_METADATA_KEY, PLAN_STATE_KEY, check_trainable_, compressed_state_dict,
                                        model_plan, plan_from_tensor)
from lrpet_dense.core.verify import factorize_checked_
from lrpet_dense.io import atomic_save, check_finite_state, load_checkpoint_safe, plain_data

from .pairing import pair_convs, unwrap_model

__all__ = [
    "LRPETEncoderDecoder", "load_model", "plan_from_checkpoint", "compressed_plan_of", "compress_model_",
    "save_compressed", "count_complexity", "output_tensors", "to_inference_", "export_onnx",
]

logger = logging.getLogger(__name__)

#: Key of the plan in ``checkpoint['meta']`` and in the root's state-dict metadata.
PLAN_KEY = PLAN_METADATA_KEY
#: Key of the LRPET hook's state (plan and projection counters) in training checkpoints.
CHECKPOINT_KEY = "lrpet"


@MODELS.register_module()
class LRPETEncoderDecoder(EncoderDecoder):
    """``EncoderDecoder`` that always loads compressed (factorised) LRPET checkpoints.

    Dense, it is exactly an ``EncoderDecoder`` (same arguments, same keys). Loading a state dict
    that carries a rank plan factorises the planned convs first.

    Args:
        factorized_from: a compressed checkpoint whose plan the model is built with (factorised from
            the start), so that fine-tuning it trains the factorised layers: the runner builds the
            optimizer before it loads ``load_from``, so layers installed while loading would not be
            in the optimizer (training such a model is an error). Defaults to None (dense).
        *args, **kwargs: as for ``EncoderDecoder``.
    """

    def __init__(self, *args, factorized_from: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        enable_compressed_loading_(self)
        if factorized_from is not None:
            plan = compressed_plan_of(factorized_from)
            if plan is None:
                raise ValueError(f"factorized_from={factorized_from!r} is not a compressed checkpoint (no LRPET plan "
                                 "in its state dict); give the output of tools/compress_seg.py")
            factorize_(self, plan, from_weights=False)

    def loss(self, inputs, data_samples):
        check_trainable_(self)  # not silently "fine-tuning" layers the optimizer does not hold
        return super().loss(inputs, data_samples)

    @property
    def lrpet_plan(self) -> Optional[RankPlan]:
        """The plan of the factorised layers installed, or None while dense."""
        return model_plan(self)


def plan_from_checkpoint(checkpoint: Dict[str, Any]) -> Optional[RankPlan]:
    """The rank plan stored in a checkpoint dict, or None.

    Looks at a training checkpoint's LRPET hook state (``checkpoint['lrpet']['plan']``) and at a
    compressed checkpoint's ``meta['lrpet_plan']`` and state dict.
    """
    state = checkpoint.get(CHECKPOINT_KEY)
    if state and state.get("plan") is not None:
        return RankPlan.from_dict(state["plan"])
    meta = checkpoint.get("meta") or {}
    if meta.get(PLAN_KEY) is not None:
        return RankPlan.from_dict(meta[PLAN_KEY])
    sd = checkpoint.get("state_dict")
    if isinstance(sd, dict) and PLAN_STATE_KEY in sd:
        return plan_from_tensor(sd[PLAN_STATE_KEY])
    return None


def compressed_plan_of(path: str) -> Optional[RankPlan]:
    """The plan of a compressed checkpoint file, or None when the file holds a dense model."""
    ckpt = load_checkpoint_safe(path)
    return plan_from_checkpoint(ckpt) if is_compressed(ckpt) else None


def is_compressed(checkpoint: Dict[str, Any]) -> bool:
    """Whether a checkpoint dict holds a factorised model (not a training checkpoint with a plan)."""
    sd = checkpoint.get("state_dict")
    meta = checkpoint.get("meta") or {}
    if meta.get(PLAN_KEY) is not None or (isinstance(sd, dict) and PLAN_STATE_KEY in sd):
        return True
    return PLAN_KEY in ((getattr(sd, "_metadata", None) or {}).get("", {}))


def output_tensors(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The segmentor's logits (``mode='tensor'``, before the argmax), e.g. to compare two models in float64."""
    with torch.no_grad():
        return model(x, mode="tensor")


def compress_model_(model: nn.Module, plan: RankPlan, *, project: bool = False, config: Optional[LRPETConfig] = None,
                    check_hw: Tuple[int, int] = (64, 64), rtol: float = 1e-4) -> List[str]:
    """Factorise the planned convs of a trained (projected) segmentor of any type in place, once checked.

    As the detectron2 adapter's: :func:`lrpet_dense.core.verify.factorize_checked_` does the steps
    (``project``, ``config`` and ``rtol`` are its options), comparing the logits
    (:func:`output_tensors`) of one random ``check_hw`` input (default 64x64) in float64.
    Returns the names of the factorised convs.
    """
    layers = pair_convs(model, LRPETConfig(include=tuple(plan.layers), include_frozen=True)).layers if project else None
    x = torch.randn(1, 3, *check_hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return factorize_checked_(model, plan, lambda m: output_tensors(m, x), project_layers=layers, config=config,
                              rtol=rtol, what="the factorised segmentor")


def save_compressed(model: nn.Module, path: str, meta: Optional[dict] = None) -> dict:
    """Save a factorised model as an mmengine-style checkpoint ``{'meta', 'state_dict'}``.

    Args:
        model: a model factorised by :func:`compress_model_`.
        path: output file (written atomically).
        meta: extra plain metadata (e.g. ``dataset_meta``); non-plain values are converted.

    Returns:
        The saved checkpoint dict.
    """
    plan = model_plan(model)
    if plan is None:
        raise ValueError("the model is not factorised: call compress_model_ first")
    meta = plain_data(dict(meta or {}))
    meta[PLAN_KEY] = plan.to_dict()
    ckpt = {"meta": meta, "state_dict": compressed_state_dict(model)}
    atomic_save(ckpt, path)
    return ckpt


def load_model(cfg, path: Optional[str], *, device: str = "cpu", dense_only: bool = False) -> Tuple[nn.Module, dict]:
    """Build ``cfg``'s segmentor (any model type) and load a dense or compressed checkpoint strictly.

    Like ``mmseg.apis.init_model``, but the checkpoint is read with ``torch.load(weights_only=True)``
    (errors name the file and any offending class), a compressed one first builds its factorised
    convs, and any missing or unexpected key is an error (mmengine only warns).

    Args:
        cfg: an mmengine ``Config`` (not modified).
        path: the checkpoint, or None for a freshly initialised model.
        device: where the model goes. Defaults to ``"cpu"``.
        dense_only: refuse a compressed checkpoint. Defaults to False.

    Returns:
        ``(model, checkpoint)``: the model in eval mode, and the checkpoint dict (``{}`` without one).
    """
    from mmengine.runner.checkpoint import load_state_dict
    from mmseg.apis import init_model

    ckpt: Dict[str, Any] = {}
    if path is not None:
        ckpt = load_checkpoint_safe(path)
        if dense_only and is_compressed(ckpt):
            raise ValueError(f"{path} is already compressed (factorised); give the dense training checkpoint it "
                             "was made from (e.g. iter_N.pth)")
        check_finite_state(ckpt.get("state_dict", ckpt), f"checkpoint {path!r}")
    model = enable_compressed_loading_(init_model(copy.deepcopy(cfg), None, device=device))
    if path is not None:
        state = ckpt.get("state_dict", ckpt)
        metadata = getattr(state, "_metadata", None)
        fixed = type(state)((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())
        if metadata is not None:
            fixed._metadata = metadata
        try:
            load_state_dict(model, fixed, strict=True)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path!r} does not match the config's model: {str(e).strip()}") from e
        meta = ckpt.get("meta") or {}
        if meta.get("dataset_meta"):
            model.dataset_meta = meta["dataset_meta"]
    return model.to(device).eval(), ckpt


def count_complexity(model: nn.Module, input_hw: Tuple[int, int]) -> Dict[str, Dict[str, int]]:
    """Params and MACs from ``mmengine.analysis.get_model_complexity_info``.

    Returns:
        ``{'backbone': {'params', 'macs'}, 'model': {'params', 'macs'}}`` (the whole model in
        ``mode='tensor'``, i.e. backbone + decode head, no auxiliary head at inference).
    """
    from mmengine.analysis import get_model_complexity_info

    from lrpet_dense.core.selection import eval_mode

    shape = (3, int(input_hw[0]), int(input_hw[1]))
    out = {}
    with eval_mode(model):
        for key, module in (("backbone", model.backbone), ("model", model)):
            info = get_model_complexity_info(module, input_shape=shape, show_table=False, show_arch=False)
            out[key] = {"params": int(info["params"]), "macs": int(info["flops"])}
    return out



def to_inference_(model: nn.Module, *, check_hw: Tuple[int, int] = (64, 64), rtol: float = 1e-4) -> nn.Module:
    """The deploy path's inference form, in place: every BatchNorm after a conv (dense or factorised)
    folded into it and ``channels_last`` weights on CPU (:mod:`lrpet_dense.core.deploy`).

    As the detectron2 adapter's: checked first on a copy (logits, :func:`output_tensors`, float64),
    nothing changes otherwise; inference only. Returns ``model`` in eval mode.
    """
    from lrpet_dense.core.deploy import EVERY_CONV, to_inference_checked_

    model = unwrap_model(model).eval()
    x = torch.randn(1, 3, *check_hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return to_inference_checked_(model, lambda m: pair_convs(m, EVERY_CONV, factorized=True).layers,
                                 lambda m: output_tensors(m, x), rtol=rtol, what="the segmentor with its BatchNorms folded")


class _TensorMode(nn.Module):
    """``model(x, mode='tensor')`` as a one-input module (what is exported)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, mode="tensor")


def export_onnx(model: nn.Module, path: str, input_hw: Tuple[int, int], *, align_ranks: int = 16) -> Dict[str, Any]:
    """Export the segmentor in ``mode='tensor'`` (image -> logits) to ONNX and check it in ONNX Runtime.

    Uses ``torch.onnx.export``'s dynamo exporter (the TorchScript one cannot export PSPNet's adaptive
    pooling to non-divisible sizes). ONNX Runtime's logits must equal PyTorch's on the same input
    within float32 tolerance. As the detectron2 adapter's, the factorised ranks are zero-padded to
    multiples of ``align_ranks`` in the exported graph (on a copy, exact; 1 turns it off), and ONNX
    Runtime's logits are checked against ``model``'s own.

    Returns:
        ``{"inputs": [...], "outputs": 1, "check": {...}, "aligned": [padded conv names]}``.

    Raises:
        ValueError: ONNX Runtime's logits differ from PyTorch's.
    """
    from lrpet_dense.core.export import export_aligned

    model = unwrap_model(model).eval()
    param = next(model.parameters())
    x = torch.randn(1, 3, *input_hw, generator=torch.Generator().manual_seed(0)).to(param.device)
    out = export_aligned(model, _TensorMode, (x,), path, align_ranks=align_ranks, dynamo=True, opset=18,
                         input_names=["image"], output_names=["logits"])
    return {"inputs": [list(x.shape)], "outputs": 1, "check": out["check"], "aligned": out["aligned"]}
