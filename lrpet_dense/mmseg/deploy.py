"""Factorised mmseg models for inference, and their checkpoints.

A compressed checkpoint carries its rank plan (plain data from :meth:`RankPlan.to_dict`) twice:

* in ``checkpoint['meta']['lrpet_plan']``, for people and tools;
* in the state dict's per-module metadata (``state_dict._metadata['']['lrpet_plan']``, the slot
  torch uses for a module's ``version``), which ``_load_from_state_dict`` receives.

:class:`LRPETEncoderDecoder` (registered in mmseg's ``MODELS``) is an ``EncoderDecoder`` that,
when a state dict with a plan is loaded into it, first installs the factorised layers of the plan
(:func:`~lrpet_dense.core.build_factorized_`) and then loads the weights. So with a config whose
model type is ``LRPETEncoderDecoder`` (the configs of this project are), the ordinary
``mmseg.apis.init_model(config, compressed.pth)``, ``tools/test.py`` and ``load_from`` all build the
factorised model with no missing or unexpected keys. A factorised model also writes its plan into
its own state dict, so checkpoints saved from it (e.g. fine-tuning) stay loadable.

Everything saved is loadable with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from torch import nn

from lrpet_dense.core import RankPlan, build_factorized_, factorize_
from lrpet_dense.io import atomic_save

__all__ = ["LRPETEncoderDecoder", "PLAN_KEY", "compress_model_", "compressed_state_dict", "save_compressed",
           "complexity", "max_rank_excess"]

logger = logging.getLogger(__name__)

#: Key of the plan in the root module's state-dict metadata and in ``checkpoint['meta']``.
PLAN_KEY = "lrpet_plan"


def _plan_metadata_hook(module: nn.Module, state_dict, prefix: str, local_metadata: dict) -> None:
    plan = getattr(module, "lrpet_plan", None)
    if plan is not None:
        local_metadata[PLAN_KEY] = plan.to_dict()


@MODELS.register_module()
class LRPETEncoderDecoder(EncoderDecoder):
    """``EncoderDecoder`` that can load compressed (factorised) LRPET checkpoints.

    Dense, it is exactly an ``EncoderDecoder`` (same arguments, same keys). Loading a state dict
    whose metadata carries a rank plan factorises the planned convs first.

    Attributes:
        lrpet_plan: the plan of the factorised layers installed, or None while dense.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lrpet_plan: Optional[RankPlan] = None
        self.register_state_dict_post_hook(_plan_metadata_hook)

    def install_plan_(self, plan: RankPlan, *, from_weights: bool) -> List[str]:
        """Factorise per ``plan`` in place: from the current weights (SVD) or empty, for loading."""
        if self.lrpet_plan is not None:
            if self.lrpet_plan.ranks != plan.ranks:
                raise ValueError("this model is already factorised with another LRPET plan; build a fresh "
                                 "model to load this checkpoint")
            return []
        names = (factorize_ if from_weights else build_factorized_)(self, plan)
        self.lrpet_plan = plan
        return names

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        plan_data = local_metadata.get(PLAN_KEY) if local_metadata else None
        if plan_data is not None:
            # Runs before the children load (torch and mmengine load the parent first), so the
            # factorised layers are in place when their weights arrive.
            try:
                self.install_plan_(RankPlan.from_dict(plan_data), from_weights=False)
            except (ValueError, TypeError) as e:
                raise ValueError(f"the compressed checkpoint's LRPET plan does not match this model/config: {e}. "
                                 "Load it with the config it was compressed with") from e
        elif self.lrpet_plan is not None and any(k.startswith(prefix + "backbone.") for k in state_dict):
            raise ValueError("cannot load a dense checkpoint (no LRPET plan in it) into a factorised model; "
                             "build the model from its config and load the dense weights into that")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def max_rank_excess(model: nn.Module, plan: RankPlan, rtol: float = 1e-4) -> Dict[str, int]:
    """Layers of ``plan`` whose dense weight has numerical rank above the planned rank.

    The rank counts singular values above ``rtol * sigma_1``. An empty result means that
    factorising reproduces the dense model exactly (to float round-off).
    """
    out = {}
    for name, lp in plan.layers.items():
        w = model.get_submodule(name).weight.detach().float()
        s = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
        r = int((s > rtol * s[0]).sum()) if s[0] > 0 else 0
        if r > lp.rank:
            out[name] = r
    return out


def compress_model_(model: LRPETEncoderDecoder, plan: RankPlan) -> List[str]:
    """Factorise the planned convs of a trained (projected) ``model`` in place.

    Raises:
        TypeError: ``model`` is not an :class:`LRPETEncoderDecoder` (its checkpoint could not be
            loaded back by the registry).
    """
    if not isinstance(model, LRPETEncoderDecoder):
        raise TypeError(f"compress a model of type LRPETEncoderDecoder (set model.type="
                        f"'LRPETEncoderDecoder' in the config), got {type(model).__name__}")
    return model.install_plan_(plan, from_weights=True)


def compressed_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """CPU state dict of a factorised model, with the plan in its metadata."""
    sd = model.state_dict()
    out = OrderedDict((k, v.detach().cpu().clone()) for k, v in sd.items())
    out._metadata = sd._metadata  # type: ignore[attr-defined]
    if PLAN_KEY not in out._metadata.get("", {}):  # type: ignore[attr-defined]
        raise ValueError("the model carries no LRPET plan: factorise it with compress_model_ first")
    return out


def _plain(value):
    """``value`` reduced to what ``torch.load(weights_only=True)`` accepts without allow-listing."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "tolist"):  # numpy scalars/arrays
        return value.tolist()
    return str(value)


def save_compressed(model: LRPETEncoderDecoder, path: str, meta: Optional[dict] = None) -> dict:
    """Save a factorised model as an mmengine-style checkpoint ``{'meta', 'state_dict'}``.

    Args:
        model: a model factorised by :func:`compress_model_`.
        path: output file (written atomically).
        meta: extra plain metadata (e.g. ``dataset_meta``); non-plain values are converted.

    Returns:
        The saved checkpoint dict.
    """
    if getattr(model, "lrpet_plan", None) is None:
        raise ValueError("the model is not factorised: call compress_model_ first")
    meta = _plain(dict(meta or {}))
    meta[PLAN_KEY] = model.lrpet_plan.to_dict()
    ckpt = {"meta": meta, "state_dict": compressed_state_dict(model)}
    atomic_save(ckpt, path)
    return ckpt


def complexity(model: nn.Module, input_hw: Tuple[int, int]) -> Dict[str, Dict[str, int]]:
    """Params and MACs from ``mmengine.analysis.get_model_complexity_info``.

    Returns:
        ``{'backbone': {'params', 'macs'}, 'model': {'params', 'macs'}}`` (the whole model in
        ``mode='tensor'``, i.e. backbone + decode head, no auxiliary head at inference).
    """
    from mmengine.analysis import get_model_complexity_info

    shape = (3, int(input_hw[0]), int(input_hw[1]))
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        out = {}
        for key, module in (("backbone", model.backbone), ("model", model)):
            info = get_model_complexity_info(module, input_shape=shape, show_table=False, show_arch=False)
            out[key] = {"params": int(info["params"]), "macs": int(info["flops"])}
    finally:
        for m, mode in was_training.items():
            m.training = mode
    return out
