"""The detectron2 training hook that projects the selected convs every ``interval`` steps.

:class:`LRPETHook` is a :class:`~detectron2.engine.HookBase` modelled on ``hooks.PreciseBN``: it
decides *when* (every ``LRPET.INTERVAL`` steps and after the last step) and hands the work to the
framework-free :class:`~lrpet_dense.core.LRPETProjector`. Place it before ``PreciseBN`` and the
``PeriodicCheckpointer`` (:func:`insert_before_checkpointer`) so every checkpoint, ``model_final.pth``
included, holds the projected, exactly low-rank weights (and, with ``TEST.PRECISE_BN``, BN
statistics recomputed for them). Its state (the rank plan as plain data and
the projector's counters) is in :meth:`LRPETHook.state_dict`, which the trainer stores in each
checkpoint, so ``--resume`` continues the schedule exactly.

Per projection it logs ``lrpet/time_s``, ``lrpet/energy_kept_mean``, ``lrpet/energy_kept_min``,
``lrpet/rel_change_mean`` and ``lrpet/rel_change_max`` to the trainer's ``EventStorage`` (hence
``metrics.json`` and TensorBoard).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.engine import HookBase, hooks

from lrpet_dense.core import ConvBN, LRPETConfig, LRPETProjector, RankPlan
from lrpet_dense.core.selection import conv_names, output_sizes, plan_layers

from .config import lrpet_config
from .pairing import pair_convs, unwrap_model

__all__ = ["LRPETHook", "build_plan", "insert_before_checkpointer"]

logger = logging.getLogger(__name__)


def default_plan_hw(cfg: CfgNode) -> Tuple[int, int]:
    """The planning input of a detectron2 config: ``INPUT.MIN_SIZE_TEST`` square."""
    return int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MIN_SIZE_TEST)


def build_plan(model: nn.Module, layers: Sequence[ConvBN], config: LRPETConfig,
               default_hw: Tuple[int, int] = (800, 800)) -> RankPlan:
    """The rank plan of ``layers`` (ratio, a MAC cut solved by the core, or the energy allocation).

    Output sizes come from a dummy forward of ``model.backbone`` at ``config.plan_input_size``
    (default: ``default_hw``, padded to the backbone's size divisibility; BN statistics untouched).
    The MAC cut is a fraction of the backbone's conv MACs (``model.backbone``: the ResNet stem..res4
    in C4 models; ResNet and FPN convs in FPN models; frozen and unselected convs included), so "cut
    50% of the backbone" means what it says, and it is what detectron2's ``FlopCountAnalysis``
    reports as the backbone. Selected convs outside it (``roi_heads.res5`` in C4 models) get the
    ratio but no output size, and do not count towards the cut. Selected convs whose factorised form
    would not save MACs are left out of the plan (not projected), unless named exactly.
    """
    model = unwrap_model(model)
    backbone = model.backbone
    h, w = config.plan_input_size or default_hw
    div = int(getattr(backbone, "size_divisibility", 0) or 0)
    if div > 1:  # the ImageList the backbone sees is padded to this
        h, w = (-(-s // div) * div for s in (h, w))
    names = conv_names(model, "backbone.")
    device = next(backbone.parameters()).device
    in_sizes: dict = {}
    sizes = output_sizes(model, names, lambda: backbone(torch.zeros(1, 3, h, w, device=device)), in_sizes)
    return plan_layers(model, layers, config, sizes, names, in_sizes)


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


class LRPETHook(HookBase):
    """Project the planned convs in place every ``interval`` steps and after the last step.

    Args:
        model: the trained model (DDP-wrapped or not); it is unwrapped.
        layers: ``(name, conv, bn)`` triples to project (from :func:`~lrpet_dense.detectron2.pair_convs`).
        plan: the rank plan of ``layers``.
        config: the schedule and projection options.

    Use :meth:`from_config` to build all of it from ``cfg.LRPET``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[ConvBN], plan: RankPlan, config: LRPETConfig):
        self._model = unwrap_model(model)
        self._layers = list(layers)
        names = {l.name for l in self._layers}
        missing = [n for n in plan.layers if n not in names]
        if missing:
            raise ValueError(f"the rank plan names {len(missing)} layer(s) that are not selected: {missing[:5]}")
        self.plan = plan
        self.config = config
        self.projector = LRPETProjector(config)
        self._logged_plan = False

    @classmethod
    def from_config(cls, cfg: CfgNode, model: nn.Module) -> "LRPETHook":
        """Select and pair the convs, build the plan from ``cfg.LRPET`` (every key is checked first,
        :func:`~lrpet_dense.detectron2.lrpet_config`, before any weight is touched)."""
        config = lrpet_config(cfg)
        pairing = pair_convs(model, config)
        pairing.log(logger)
        plan = build_plan(model, pairing.layers, config, default_plan_hw(cfg))
        return cls(model, pairing.layers, plan, config)

    def before_train(self):
        if not self._logged_plan:
            logger.info("LRPET rank plan (%d layers; projection every %d steps from step %d and after the last "
                        "step; ET=%s, BNR=%s):\n%s", len(self.plan), self.config.interval, self.config.begin,
                        self.config.energy_transfer, self.config.bn_rectification, self.plan.format_table())
            self._logged_plan = True

    def after_step(self):
        steps_done = self.trainer.iter + 1
        is_last = steps_done >= self.trainer.max_iter
        if not self.projector.should_project(steps_done, is_last):
            return
        # With several workers the layers are shared out, each projected once (with rank 0's BN
        # statistics) and broadcast, so every worker ends with bit-identical weights and stats.
        summary = self.projector.project_(self._layers, self.plan, steps_done, final=is_last)
        self.trainer.storage.put_scalars(**summary.scalars("lrpet/"), smoothing_hint=False)
        if is_last and summary.error is None:
            self._recalibrate_bn(steps_done)

    def _recalibrate_bn(self, steps_done: int) -> None:
        """BN statistics for the final weights (``LRPET.PRECISE_BN_ITERS``), unless detectron2's own
        ``PreciseBN`` hook, which runs after this one at the last step, recomputes them anyway."""
        if not self.config.precise_bn_iters:
            return
        if any(isinstance(h, hooks.PreciseBN) for h in getattr(self.trainer, "_hooks", ())):
            logger.info("LRPET: BN statistics after the final projection are recomputed by detectron2's PreciseBN "
                        "(TEST.PRECISE_BN); LRPET.PRECISE_BN_ITERS is not used")
            return
        self.projector.recalibrate_bn_(self._model, self.trainer.data_loader, lambda m, batch: m(batch),
                                       steps_done)

    def state_dict(self) -> dict:
        """Plain data only (loadable with ``torch.load(weights_only=True)``): the plan and the counters."""
        return {"plan": self.plan.to_dict(), "projector": self.projector.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "projector" not in state_dict:
            logger.warning("LRPET: the checkpoint has no LRPET hook state; the schedule starts afresh")
            return
        saved = RankPlan.from_dict(state_dict["plan"]) if "plan" in state_dict else None
        if saved is not None and saved.ranks != self.plan.ranks:
            names = {l.name: tuple(l.conv.weight.shape) for l in self._layers}
            bad = [n for n, lp in saved.layers.items() if names.get(n) != tuple(lp.shape)]
            if bad:
                raise ValueError(f"the checkpoint's LRPET plan does not match this model/config: layer(s) {bad[:5]} "
                                 "are not selected or have another shape. Resume with the config it was trained with.")
            logger.warning("LRPET: the checkpoint's rank plan differs from the one computed from the config; "
                           "continuing with the checkpoint's plan so the resumed run matches the original")
            self.plan = saved
        self.projector.load_state_dict(state_dict["projector"])
        logger.info("LRPET: resumed schedule state %s", state_dict["projector"])
