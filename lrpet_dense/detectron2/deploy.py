"""Compressed (factorised) detectron2 checkpoints: write them, and load them through detectron2's own paths.

A compressed checkpoint is a ``.pth`` file loadable with ``torch.load(weights_only=True)``::

    {"model": state dict of the factorised model (+ "_lrpet_plan": the plan as UTF-8 JSON bytes, uint8),
     "lrpet_plan": RankPlan.to_dict() (plain data), "lrpet_factorized": [names of factorised convs]}

Loading is registry-integrated: the LRPET configs set ``MODEL.META_ARCHITECTURE:
"LRPETGeneralizedRCNN"``, a :class:`~detectron2.modeling.GeneralizedRCNN` registered in
``META_ARCH_REGISTRY`` whose ``load_state_dict`` pre-hook reads the plan carried in the state dict
and installs the factorised convs (:func:`~lrpet_dense.core.build_factorized_`) before the weights
are copied. So ``DefaultPredictor(cfg)`` and ``train_det.py --eval-only MODEL.WEIGHTS compressed.pth``
build the factorised model and load it with no missing or unexpected keys, while a dense checkpoint
loads into the same config as usual. A plan that does not fit the model (other layers or shapes), a
factorised state dict without a plan, or a dense checkpoint loaded into an already factorised model
is a ``ValueError`` naming the problem. (A stock ``GeneralizedRCNN`` cannot know about factorised
layers: detectron2 only warns about missing keys there, so use the LRPET config, or call
:func:`enable_compressed_loading_` on the model.)
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from lrpet_dense.core import FactorizedConv2d, RankPlan, build_factorized_, factorize_
from lrpet_dense.io import atomic_save

from .pairing import unwrap_model

__all__ = [
    "LRPETGeneralizedRCNN", "enable_compressed_loading_", "PLAN_STATE_KEY", "plan_from_checkpoint",
    "check_low_rank", "compress_model_", "compressed_checkpoint", "save_compressed", "count_flops_params",
]

logger = logging.getLogger(__name__)

# Key of the plan (UTF-8 JSON as a uint8 tensor) inside a compressed model state dict.
PLAN_STATE_KEY = "_lrpet_plan"


def _plan_to_tensor(plan: RankPlan) -> torch.Tensor:
    return torch.tensor(list(json.dumps(plan.to_dict()).encode("utf-8")), dtype=torch.uint8)


def _plan_from_tensor(t: torch.Tensor) -> RankPlan:
    return RankPlan.from_dict(json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8")))


def _factorized_names(model: nn.Module) -> Dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedConv2d)}


def _install_plan_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    """Before weights are copied: install the factorised convs the state dict's plan asks for."""
    key = prefix + PLAN_STATE_KEY
    have = _factorized_names(module)
    if key not in state_dict:
        stray = [k for k in state_dict if k.endswith(".conv_a.weight")]
        if stray and not have:
            raise ValueError(f"the state dict has factorised layers ({stray[0]!r}, ...) but no LRPET plan "
                             f"({PLAN_STATE_KEY!r}): it was not written by lrpet_dense's compression tool")
        if have and not any(k.endswith(".conv_a.weight") for k in state_dict):
            raise ValueError(f"this model is factorised ({len(have)} layers) but the checkpoint is dense; build a "
                             "fresh model from the config to load a dense checkpoint")
        return
    plan = _plan_from_tensor(state_dict.pop(key))
    wanted = {n: lp.rank for n, lp in plan.layers.items() if lp.factorize}
    if have:
        if have != wanted:
            raise ValueError("this model is already factorised with another plan than the checkpoint's; "
                             "build a fresh model from the config to load it")
        return
    try:
        names = build_factorized_(module, plan)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the compressed checkpoint does not match this model/config: {e}") from e
    logger.info("LRPET: built %d factorised convs from the checkpoint's plan (p=%g) before loading it",
                len(names), plan.ratio)


def enable_compressed_loading_(model: nn.Module) -> nn.Module:
    """Let ``model.load_state_dict`` install factorised convs from a compressed state dict's plan. In place."""
    model = unwrap_model(model)
    if not getattr(model, "_lrpet_loading_enabled", False):
        model.register_load_state_dict_pre_hook(_install_plan_pre_hook)
        model._lrpet_loading_enabled = True
    return model


@META_ARCH_REGISTRY.register()
class LRPETGeneralizedRCNN(GeneralizedRCNN):
    """:class:`~detectron2.modeling.GeneralizedRCNN` that also loads compressed LRPET checkpoints.

    Identical to ``GeneralizedRCNN`` (same modules, same state dict keys, same forward) for dense
    weights; a compressed state dict (see module docs) first rebuilds its factorised convs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        enable_compressed_loading_(self)


def plan_from_checkpoint(checkpoint: Mapping[str, Any]) -> Optional[RankPlan]:
    """The rank plan stored in a checkpoint dict, or None.

    Looks at a compressed checkpoint's ``lrpet_plan`` and at a training checkpoint's LRPET hook state
    (``checkpoint["trainer"]["hooks"]["LRPETHook"]["plan"]``).
    """
    if checkpoint.get("lrpet_plan") is not None:
        return RankPlan.from_dict(checkpoint["lrpet_plan"])
    hook_state = (checkpoint.get("trainer") or {}).get("hooks", {}).get("LRPETHook")
    if hook_state and hook_state.get("plan") is not None:
        return RankPlan.from_dict(hook_state["plan"])
    return None


def check_low_rank(model: nn.Module, plan: RankPlan, rtol: float = 1e-4) -> List[Tuple[str, int, int]]:
    """Planned convs whose weight has numerical rank above the plan's.

    Args:
        model: the dense model.
        plan: the rank plan.
        rtol: singular values below ``rtol * s_1`` count as zero. Defaults to 1e-4.

    Returns:
        ``(name, numerical rank, planned rank)`` for each offending layer (empty when all are low-rank).
    """
    model = unwrap_model(model)
    bad = []
    for name, lp in plan.layers.items():
        w = model.get_submodule(name).weight.detach()
        m = w.reshape(w.shape[0], -1).double()
        # squared singular values from the smaller Gram matrix: much faster than an SVD
        ev = torch.linalg.eigvalsh(m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m)
        r = int((ev > rtol ** 2 * ev[-1]).sum()) if ev[-1] > 0 else 0
        if r > lp.rank:
            bad.append((name, r, lp.rank))
    return bad


def compress_model_(model: nn.Module, plan: RankPlan, rtol: float = 1e-4) -> List[str]:
    """Factorise the planned convs of a trained, projected dense model in place.

    Raises:
        ValueError: some planned conv is not low-rank (the checkpoint was not projected with this
            plan), so factorising it would change the model's outputs.
    """
    model = unwrap_model(model)
    bad = check_low_rank(model, plan, rtol)
    if bad:
        raise ValueError(f"{len(bad)} planned conv(s) are not of their planned rank, e.g. {bad[:3]} "
                         "(name, numerical rank, planned rank): the weights were not projected with this plan")
    return factorize_(model, plan)


def compressed_checkpoint(model: nn.Module, plan: RankPlan) -> Dict[str, Any]:
    """The compressed checkpoint dict of a factorised ``model`` (plain data and tensors only)."""
    model = unwrap_model(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state[PLAN_STATE_KEY] = _plan_to_tensor(plan)
    return {"model": state, "lrpet_plan": plan.to_dict(), "lrpet_factorized": sorted(_factorized_names(model))}


def save_compressed(model: nn.Module, plan: RankPlan, path: str) -> None:
    """Write :func:`compressed_checkpoint` to ``path`` atomically."""
    atomic_save(compressed_checkpoint(model, plan), path)
    logger.info("wrote compressed checkpoint %s", path)


def count_flops_params(model: nn.Module, image_hw: Tuple[int, int]) -> Dict[str, Dict[str, int]]:
    """MACs and parameters of the whole model and its backbone, by detectron2's ``FlopCountAnalysis``.

    Counts one inference of a ``3 x H x W`` image, as detectron2's ``tools/analyze_model.py`` does
    (fvcore counts one "flop" per multiply-accumulate).

    Returns:
        ``{"flops": {"model": ..., "backbone": ...}, "params": {"model": ..., "backbone": ...}}``.
    """
    from detectron2.utils.analysis import FlopCountAnalysis
    from fvcore.nn import parameter_count

    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    try:
        h, w = image_hw
        g = torch.Generator().manual_seed(0)
        image = (torch.rand(3, h, w, generator=g) * 255).to(model.device)
        flops = FlopCountAnalysis(model, [{"image": image, "height": h, "width": w}])
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_module = flops.by_module()  # keys are prefixed by the TracingAdapter's "model."
        params = parameter_count(model)
        return {"flops": {"model": int(flops.total()), "backbone": int(by_module["model.backbone"])},
                "params": {"model": int(params[""]), "backbone": int(params.get("backbone", 0))}}
    finally:
        model.train(was_training)
