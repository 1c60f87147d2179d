"""The detectron2 training hook that projects the selected convs every ``interval`` steps.

:class:`LRPETHook` is a :class:`~detectron2.engine.HookBase` modelled on ``hooks.PreciseBN``: it
decides *when* (every ``LRPET.INTERVAL`` steps and after the last step) and hands the work to the
framework-free :class:`~lrpet_dense.core.LRPETSession` (the same session a plain PyTorch loop
drives, and mmseg's hook). Place it before ``PreciseBN`` and the
``PeriodicCheckpointer`` (:func:`insert_before_checkpointer`) so every checkpoint, ``model_final.pth``
included, holds the projected, exactly low-rank weights (and, with ``TEST.PRECISE_BN``, BN
statistics recomputed for them). Its state (the rank plan as plain data and
the projector's counters) is in :meth:`LRPETHook.state_dict`, which the trainer stores in each
checkpoint, so ``--resume`` continues the schedule exactly.

Build it from a model and an :class:`~lrpet_dense.core.LRPETConfig` (any trainer, LazyConfig
included: ``LRPETHook(model, LRPETConfig(target_macs_cut=0.5, interval=500))``) or from a yacs
config (:meth:`LRPETHook.from_config`, ``cfg.LRPET``).

Per projection it logs ``lrpet/time_s``, ``lrpet/energy_kept_mean``, ``lrpet/energy_kept_min``,
``lrpet/rel_change_mean``, ``lrpet/rel_change_max`` and ``lrpet/num_projections`` to the trainer's ``EventStorage`` (hence
``metrics.json`` and TensorBoard).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

from torch import nn

from detectron2.config import CfgNode
from detectron2.engine import HookBase, hooks

from lrpet_dense.core import ConvBN, LRPETConfig, LRPETSession, RankPlan
from lrpet_dense.core.selection import FilterFn

from .adapter import ADAPTER, default_plan_hw
from .config import lrpet_config
from .pairing import unwrap_model

__all__ = ["LRPETHook", "build_plan", "insert_before_checkpointer", "default_plan_hw"]

logger = logging.getLogger(__name__)


def build_plan(model: nn.Module, layers: Sequence[ConvBN], config: LRPETConfig,
               input_hw: Optional[Tuple[int, int]] = None) -> RankPlan:
    """The rank plan of ``layers`` (ratio, a MAC cut solved by the core, or the energy allocation).

    Output sizes come from a dummy forward of ``model.backbone`` at ``config.plan_input_size`` (default:
    ``input_hw``, else :func:`default_plan_hw`; padded to the backbone's size divisibility; BN statistics
    untouched). The MAC cut is a fraction of the backbone's conv MACs (``model.backbone``: the ResNet
    stem..res4 in C4 models; ResNet and FPN convs in FPN models; frozen and unselected convs included),
    so "cut 50% of the backbone" means what it says, and it is what detectron2's ``FlopCountAnalysis``
    reports as the backbone. Selected convs outside it (``roi_heads.res5`` in C4 models) get the ratio
    but no output size, and do not count towards the cut. Selected convs whose factorised form would
    not save MACs are left out of the plan (not projected), unless named exactly.
    """
    return ADAPTER.build_plan(model, layers, config, input_hw)


def insert_before_checkpointer(hook_list: List[Optional[HookBase]], hook: HookBase) -> List[Optional[HookBase]]:
    """Insert ``hook`` before ``PreciseBN`` and the ``PeriodicCheckpointer``, in place.

    Before ``PreciseBN`` (when enabled) so the BN statistics it recomputes at the end are those of
    the projected weights; before the ``PeriodicCheckpointer`` so checkpoints hold projected weights;
    on workers without a checkpointer, before ``EvalHook``; else at the end.

    Returns:
        ``hook_list``.
    """
    for kind in (hooks.PreciseBN, hooks.PeriodicCheckpointer, hooks.EvalHook):
        for i, h in enumerate(hook_list):
            if isinstance(h, kind):
                hook_list.insert(i, hook)
                return hook_list
    hook_list.append(hook)
    return hook_list


def _training_forward(model: nn.Module, batch) -> None:
    """detectron2's training forward (losses, no backward) on one loader batch."""
    model(batch)


class LRPETHook(HookBase):
    """Project the planned convs in place every ``interval`` steps and after the last step.

    Args:
        model: the trained model (DDP-wrapped or not; it is unwrapped), dense: a factorised model is
            refused.
        config: the selection, plan, schedule and projection options. Defaults to ``LRPETConfig()``.
        layers: the selected ``(name, conv, bn)`` triples; with ``plan``, instead of selecting and
            planning from ``config`` (e.g. a plan made elsewhere). Defaults to None.
        plan: their rank plan (with ``layers``). Defaults to None.
        filter_fn: ``filter_fn(conv, name) -> bool`` narrows the selection. Defaults to None.
        input_hw: the planning input size when ``config.plan_input_size`` is not set. Defaults to None:
            :func:`default_plan_hw` (800; :meth:`from_config` passes ``INPUT.MIN_SIZE_TEST``).

    Use :meth:`from_config` to build it from ``cfg.LRPET`` (yacs).
    """

    def __init__(self, model: nn.Module, config: Optional[LRPETConfig] = None, *,
                 layers: Optional[Sequence[ConvBN]] = None, plan: Optional[RankPlan] = None,
                 filter_fn: Optional[FilterFn] = None, input_hw: Optional[Tuple[int, int]] = None):
        config = LRPETConfig() if config is None else config
        if not isinstance(config, LRPETConfig):
            raise TypeError(f"LRPETHook(model, config): config must be an LRPETConfig, got {type(config).__name__}"
                            " (a yacs config: LRPETHook.from_config(cfg, model))")
        if (layers is None) != (plan is None):
            raise ValueError("LRPETHook: give both layers and plan, or neither (then they come from config)")
        if plan is None:
            self.session = ADAPTER.session(model, config, filter_fn=filter_fn, input_hw=input_hw, log=logger)
        else:
            self.session = LRPETSession(unwrap_model(model), layers, plan, config)
        self._logged_plan = False

    @classmethod
    def from_config(cls, cfg: CfgNode, model: nn.Module) -> "LRPETHook":
        """Select and pair the convs, build the plan from ``cfg.LRPET`` (every key is checked first,
        :func:`~lrpet_dense.detectron2.lrpet_config`, before any weight is touched)."""
        return cls(model, lrpet_config(cfg), input_hw=default_plan_hw(model, cfg))

    # the session's parts, for logs and tests
    config = property(lambda self: self.session.config)
    plan = property(lambda self: self.session.plan)
    projector = property(lambda self: self.session.projector)
    layers = property(lambda self: self.session.layers)

    def before_train(self):
        if not self._logged_plan:
            self.session.log_plan(logger)
            self._logged_plan = True
        # BN statistics for the final weights (LRPET.PRECISE_BN_ITERS), on the trainer's own data loader,
        # unless detectron2's PreciseBN hook (TEST.PRECISE_BN), which runs after this one at the last step,
        # recomputes them anyway.
        if self.session.config.precise_bn_iters and self.session.train_data is None:
            if any(isinstance(h, hooks.PreciseBN) for h in getattr(self.trainer, "_hooks", ())):
                logger.info("LRPET: BN statistics after the final projection are recomputed by detectron2's "
                            "PreciseBN (TEST.PRECISE_BN); LRPET.PRECISE_BN_ITERS is not used")
            elif getattr(self.trainer, "data_loader", None) is not None:
                self.session.train_data = (self.trainer.data_loader, _training_forward)

    def after_step(self):
        steps_done = self.trainer.iter + 1
        # With several workers the layers are shared out, each projected once (with rank 0's BN
        # statistics) and broadcast, so every worker ends with bit-identical weights and stats.
        summary = self.session.step(steps_done, is_last=steps_done >= self.trainer.max_iter)
        if summary is not None:
            self.trainer.storage.put_scalars(**self.session.scalars(summary), smoothing_hint=False)

    def state_dict(self) -> dict:
        """Plain data only (loadable with ``torch.load(weights_only=True)``): the plan and the counters."""
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.session.load_state_dict(state_dict)
