"""``LRPETHook``: LRPET projections during mmengine/mmseg training.

Usage in a config::

    custom_imports = dict(imports=['lrpet_dense.mmseg'], allow_failed_imports=False)
    custom_hooks = [dict(type='LRPETHook', target_macs_cut=0.3, interval=500)]

The hook decides *when* (every ``interval`` iterations and after the last one, before the
``CheckpointHook`` writes); the framework-free core decides *how*. Its keywords are the fields of
:class:`~lrpet_dense.core.LRPETConfig` (detectron2's ``cfg.LRPET`` keys, in lower case).
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn

from lrpet_dense.core import ConvBN, LRPETConfig, LRPETProjector, RankPlan, enable_compressed_loading_
from lrpet_dense.core.factorize import model_plan
from lrpet_dense.core.selection import conv_names, output_sizes, plan_layers

from .checkpoint import restore_legacy_buffers_
from .deploy import CHECKPOINT_KEY
from .pairing import pair_convs, unwrap_model

__all__ = ["LRPETHook", "build_plan"]

logger = logging.getLogger(__name__)


def default_plan_hw(model: nn.Module) -> Tuple[int, int]:
    """The planning input of a segmentor: its crop size (``data_preprocessor.size``), else 512x512."""
    size = getattr(getattr(model, "data_preprocessor", None), "size", None) or (512, 512)
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_plan(model: nn.Module, layers: Sequence[ConvBN], config: LRPETConfig,
               default_hw: Optional[Tuple[int, int]] = None) -> RankPlan:
    """The rank plan of ``layers`` of an mmseg segmentor (ratio, MAC cut, or energy allocation).

    Output sizes come from a dummy forward of the backbone at ``config.plan_input_size`` (default:
    ``default_hw``, else the crop size; BN statistics untouched), and the MAC cut is measured against
    **all** the backbone's convs, so ``target_macs_cut=0.3`` means 30% of the backbone's conv MACs,
    whatever the selection. Selected layers outside the backbone (e.g. head convs) are measured on a
    whole-model forward. Selected convs whose factorised form would not save MACs are left out of
    the plan (not projected), unless named exactly in ``include`` or ``overrides``.
    """
    model = unwrap_model(model)
    h, w = config.plan_input_size or default_hw or default_plan_hw(model)
    param = next(model.backbone.parameters())
    x = torch.zeros(1, 3, h, w, device=param.device, dtype=param.dtype)
    backbone_names = conv_names(model, "backbone.")
    in_sizes: dict = {}
    sizes = output_sizes(model, backbone_names, lambda: model.backbone(x), in_sizes)
    others = [l.name for l in layers if l.name not in sizes]
    if others:
        sizes.update(output_sizes(model, others, lambda: model(x, mode="tensor"), in_sizes))
    return plan_layers(model, layers, config, sizes, backbone_names, in_sizes)


def _loss_forward(model: nn.Module, data_batch) -> None:
    """The training forward of a segmentor on a loader batch (no backward): every BN a step updates sees it."""
    model(**model.data_preprocessor(data_batch, True), mode="loss")


@HOOKS.register_module()
class LRPETHook(Hook):
    """Project the selected convs onto their planned rank every ``interval`` iterations.

    Args:
        **options: the fields of :class:`~lrpet_dense.core.LRPETConfig`, with its defaults:
            ``ratio`` (default 0.5) or ``target_macs_cut``, ``overrides``, ``include`` (default: every
            conv of the backbone), ``exclude``, ``include_frozen``, ``interval`` (500), ``begin``,
            ``energy_transfer``, ``bn_rectification``, ``ridge``, ``residual``, ``on_error``,
            ``plan_input_size`` (default: the crop size), ``rank_policy``. detectron2's
            ``cfg.LRPET.<KEY>`` are the same options.
    """

    # Runs after the optimizer step, before LoggerHook (BELOW_NORMAL) logs the scalars and before
    # CheckpointHook (VERY_LOW) writes, so every checkpoint holds projected weights.
    priority = "NORMAL"

    def __init__(self, **options: Any) -> None:
        self.config = LRPETConfig.from_kwargs(options, who="LRPETHook")
        self.projector = LRPETProjector(self.config)
        self.plan: Optional[RankPlan] = None
        self._loaded_plan: Optional[RankPlan] = None
        self._layers: List[ConvBN] = []

    # -- setup ----------------------------------------------------------------------------------
    def before_run(self, runner) -> None:
        """Let the model load compressed checkpoints whatever its type (before the runner loads any).

        With a stock ``EncoderDecoder``, ``tools/test.py`` (or ``load_from``) on a compressed checkpoint
        then builds its factorised convs from the checkpoint's plan instead of ignoring their weights.
        """
        enable_compressed_loading_(unwrap_model(runner.model))

    def before_train(self, runner) -> None:
        """Pair convs with their BNs and compute (or take over from a resumed checkpoint) the plan."""
        model = unwrap_model(runner.model)
        if model_plan(model) is not None:
            raise ValueError(f"LRPETHook: LRPET training needs a dense model, but the model is factorised: "
                             f"load_from={getattr(runner, '_load_from', None)!r} is a compressed checkpoint. Train "
                             "from the dense checkpoint it was made from (e.g. iter_N.pth), or remove LRPETHook to "
                             "fine-tune the factorised model")
        pairing = pair_convs(model, self.config)
        pairing.log(runner.logger)
        plan = build_plan(model, pairing.layers, self.config)
        if self._loaded_plan is not None:
            if self._loaded_plan.ranks != plan.ranks:
                runner.logger.warning("LRPET: the plan in the resumed checkpoint differs from the one the "
                                      "current options give; keeping the checkpoint's plan")
            plan = self._loaded_plan
        self.plan = plan
        self._layers = [p for p in pairing.layers if p.name in plan]
        missing = [n for n in plan.layers if n not in {p.name for p in self._layers}]
        if missing:
            raise ValueError(f"LRPETHook: planned layers {missing[:5]} are not selectable in this model")
        runner.logger.info("LRPET rank plan:\n" + plan.format_table())

    # -- training -------------------------------------------------------------------------------
    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        steps_done = runner.iter + 1  # runner.iter is incremented after the after_train_iter hooks
        if self.plan is None or not self.projector.should_project(steps_done, self.is_last_train_iter(runner)):
            return
        # With several ranks the layers are shared out, each projected once (with rank 0's BN
        # statistics) and broadcast, so every rank ends with bit-identical weights and stats.
        is_last = self.is_last_train_iter(runner)
        summary = self.projector.project_(self._layers, self.plan, steps_done, final=is_last)
        if is_last and summary.error is None:  # BN statistics for the final weights (precise_bn_iters)
            self.projector.recalibrate_bn_(unwrap_model(runner.model), runner.train_dataloader, _loss_forward,
                                           steps_done)
        scalars = summary.scalars()
        scalars["lrpet/num_projections"] = float(self.projector.num_projections)
        # The visualizer records each projection at its own step (scalars.json, TensorBoard, ...).
        # They are not put in the message hub's scalar buffers: LoggerHook would re-log the last
        # values at every logging interval as if a projection had happened there.
        runner.visualizer.add_scalars(scalars, step=steps_done)
        runner.message_hub.update_info("lrpet/last_projection", dict(scalars, step=steps_done))
        runner.logger.info(f"LRPET projection {self.projector.num_projections} after iteration {steps_done}: "
                           + ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in scalars.items()))

    # -- checkpoint state -----------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Store the plan (plain data) and the projection counters under ``checkpoint['lrpet']``."""
        if self.plan is None:
            return
        checkpoint[CHECKPOINT_KEY] = {"plan": self.plan.to_dict(), "projector": self.projector.state_dict()}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Restore the plan and counters; warn when the checkpoint predates LRPET."""
        restore_legacy_buffers_(checkpoint)  # a checkpoint written by lrpet_dense 0.1
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            runner.logger.warning("LRPET: the loaded checkpoint has no 'lrpet' state (a dense or older "
                                  "checkpoint); the plan is computed afresh and projection starts from here")
            return
        self._loaded_plan = RankPlan.from_dict(state["plan"])
        self.projector.load_state_dict(state.get("projector", {}))
