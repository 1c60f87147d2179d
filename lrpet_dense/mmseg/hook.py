"""``LRPETHook``: LRPET projections during mmengine/mmseg training.

Usage in a config::

    custom_imports = dict(imports=['lrpet_dense.mmseg'], allow_failed_imports=False)
    custom_hooks = [dict(type='LRPETHook', target_macs_cut=0.3, interval=500)]

The hook decides *when* (every ``interval`` iterations and after the last one, before the
``CheckpointHook`` writes); the framework-free core decides *how*.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from lrpet_dense.core import (ConvBN, LRPETProjector, RankPlan, build_rank_plan, conv_macs,
                              enable_compressed_loading_, explicit_names, layer_specs, model_plan,
                              record_output_sizes)

from .checkpoint import restore_legacy_buffers_
from .deploy import CHECKPOINT_KEY
from .pairing import DEFAULT_INCLUDE, pair_conv_bn

__all__ = ["LRPETHook", "build_seg_plan", "backbone_conv_macs"]

logger = logging.getLogger(__name__)



def _input_hw(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, int]:
    if input_size is None:
        # mmseg configs set the crop size on the data preprocessor (``data_preprocessor.size``).
        input_size = getattr(getattr(model, "data_preprocessor", None), "size", None) or (512, 512)
    h, w = (int(input_size), int(input_size)) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    return h, w


def _backbone_sizes(model: nn.Module, names: Sequence[str], hw: Tuple[int, int]) -> Dict[str, Tuple[int, int]]:
    """Output sizes of ``names`` (full names under ``backbone.``) from one eval-mode dummy forward."""
    backbone = model.backbone
    param = next(backbone.parameters())
    x = torch.zeros(1, 3, *hw, device=param.device, dtype=param.dtype)
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()  # BN must not update its running statistics on the dummy input
    try:
        sizes = record_output_sizes(model, names, lambda: backbone(x))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return sizes


def backbone_conv_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """Analytic MACs of every conv of ``model.backbone`` at ``input_size`` (for planning only)."""
    names = [f"backbone.{n}" for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d)]
    sizes = _backbone_sizes(model, names, _input_hw(model, input_size))
    return sum(conv_macs(tuple(model.get_submodule(n).weight.shape), sizes[n]) for n in names if n in sizes)


def build_seg_plan(
    model: nn.Module,
    layers: Sequence[ConvBN],
    *,
    ratio: Optional[float] = None,
    target_macs_cut: Optional[float] = None,
    overrides: Optional[Mapping[str, float]] = None,
    input_size: Optional[Sequence[int]] = None,
    project_unfactorized: Sequence[str] = (),
) -> RankPlan:
    """The rank plan of ``layers`` of an mmseg segmentor.

    Output sizes come from a dummy forward of the backbone at ``input_size``, and the MAC cut is
    measured against **all** the backbone's convs, so ``target_macs_cut=0.3`` means 30% of the
    backbone's conv MACs, whatever the selection.

    Args:
        model: the unwrapped segmentor (with a ``backbone``).
        layers: the selected layers (from :func:`~lrpet_dense.mmseg.pairing.pair_conv_bn`).
        ratio: one rank pruning ratio ``p``; exclusive with ``target_macs_cut``.
        target_macs_cut: fraction of the backbone's conv MACs to remove.
        overrides: ``{pattern: ratio}`` per-layer ratios. Defaults to None.
        input_size: ``(H, W)`` of the planning input. Defaults to ``data_preprocessor.size``
            (the crop size) or 512x512.
        project_unfactorized: names of selected layers to project even where their factorised form
            would not save MACs (others such are left out of the plan). Defaults to none.
    """
    hw = _input_hw(model, input_size)
    backbone_names = [f"backbone.{n}" for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d)]
    wanted = sorted(set(backbone_names) | {l.name for l in layers if l.name.startswith("backbone.")})
    sizes = _backbone_sizes(model, wanted, hw)
    # Selected layers outside the backbone (e.g. head convs) are measured on a whole-model forward.
    others = [l.name for l in layers if l.name not in sizes]
    if others:
        x = torch.zeros(1, 3, *hw, device=next(model.parameters()).device)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            sizes.update(record_output_sizes(model, others, lambda: model(x, mode="tensor")))
        finally:
            for m, mode in modes.items():
                m.training = mode
    reference = sum(conv_macs(tuple(model.get_submodule(n).weight.shape), sizes[n])
                    for n in backbone_names if n in sizes)
    return build_rank_plan(layer_specs(layers, sizes), ratio, target_macs_cut=target_macs_cut,
                           overrides=overrides, reference_macs=reference, project_unfactorized=project_unfactorized)


def _check_patterns(value, what: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{what} must be a list of non-empty fnmatch patterns (str), got {value!r}")
    return tuple(value)


@HOOKS.register_module()
class LRPETHook(Hook):
    """Project the selected convs onto their planned rank every ``interval`` iterations.

    Options and their detectron2 counterparts (``cfg.LRPET.*``) have the same names.

    Args:
        ratio: one rank pruning ratio ``p`` in ``[0, 1)``. Exactly one of ``ratio`` and
            ``target_macs_cut`` must be given.
        target_macs_cut: fraction in ``(0, 1)`` of the backbone's conv MACs to remove after
            factorisation; the one ratio ``p`` is solved for it.
        overrides: ``{fnmatch pattern: ratio}`` per-layer ratios. Defaults to None.
        include: fnmatch patterns of conv names to project. Defaults to ``('backbone.*',)``: every
            conv of the backbone.
        exclude: fnmatch patterns of conv names not to project. Defaults to ().
        interval: project after every ``interval`` training iterations (> 0). Defaults to 500.
        begin: no projection before this many iterations (>= 0). Defaults to 0.
        energy_transfer: ET on/off. Defaults to True.
        bn_rectification: BNR on/off. Defaults to True.
        ridge: ``lambda`` (>= 0) of the BN-rectified recovery. Defaults to 1e-5.
        residual: residual factor ``r`` in [0, 1]. Defaults to 0.
        include_frozen: also project convs with frozen weights (``frozen_stages``); they get no
            gradient, so projecting them is a one-shot truncation. Defaults to False.
        plan_input_size: ``(H, W)`` used to measure output sizes for the MAC plan. Defaults to the
            config's crop size (``model.data_preprocessor.size``), else 512x512.
        on_error: when a projection fails (e.g. NaN/Inf weights; no layer is changed either way):
            ``'raise'`` stops training with the error, naming the layer and the iteration;
            ``'skip'`` logs it and training goes on. Defaults to ``'raise'``.
    """

    # Runs after the optimizer step, before LoggerHook (BELOW_NORMAL) logs the scalars and before
    # CheckpointHook (VERY_LOW) writes, so every checkpoint holds projected weights.
    priority = "NORMAL"

    def __init__(
        self,
        ratio: Optional[float] = None,
        target_macs_cut: Optional[float] = None,
        overrides: Optional[Mapping[str, float]] = None,
        include: Sequence[str] = DEFAULT_INCLUDE,
        exclude: Sequence[str] = (),
        interval: int = 500,
        begin: int = 0,
        energy_transfer: bool = True,
        bn_rectification: bool = True,
        ridge: float = 1e-5,
        residual: float = 0.0,
        include_frozen: bool = False,
        plan_input_size: Optional[Union[int, Sequence[int]]] = None,
        on_error: str = "raise",
    ) -> None:
        if (ratio is None) == (target_macs_cut is None):
            raise ValueError(f"LRPETHook: give exactly one of ratio (rank pruning ratio in [0, 1)) and "
                             f"target_macs_cut (fraction of backbone MACs in (0, 1)); got ratio={ratio!r}, "
                             f"target_macs_cut={target_macs_cut!r}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0.0 <= ratio < 1.0):
            raise ValueError(f"LRPETHook: ratio must lie in [0, 1), got {ratio!r}")
        if target_macs_cut is not None and (isinstance(target_macs_cut, bool)
                                            or not isinstance(target_macs_cut, (int, float))
                                            or not 0.0 < target_macs_cut < 1.0):
            raise ValueError(f"LRPETHook: target_macs_cut must lie in (0, 1), got {target_macs_cut!r}")
        overrides = dict(overrides or {})
        for pattern, r in overrides.items():
            if not isinstance(pattern, str) or isinstance(r, bool) or not isinstance(r, (int, float)) \
                    or not 0.0 <= r < 1.0:
                raise ValueError(f"LRPETHook: overrides must map fnmatch patterns to ratios in [0, 1), "
                                 f"got {pattern!r}: {r!r}")
        if plan_input_size is not None:
            sizes = (plan_input_size,) * 2 if isinstance(plan_input_size, int) else tuple(plan_input_size)
            if len(sizes) != 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
                raise ValueError(f"LRPETHook: plan_input_size must be an int or (H, W) of positive ints, "
                                 f"got {plan_input_size!r}")
            plan_input_size = sizes
        for name, flag in (("energy_transfer", energy_transfer), ("bn_rectification", bn_rectification),
                           ("include_frozen", include_frozen)):
            if not isinstance(flag, bool):
                raise ValueError(f"LRPETHook: {name} must be True or False, got {flag!r}")
        try:
            self.projector = LRPETProjector(interval, begin, energy_transfer=energy_transfer,
                                            bn_rectification=bn_rectification, ridge=ridge, residual=residual,
                                            on_error=on_error)
        except ValueError as e:
            raise ValueError(f"LRPETHook: {e}") from e
        self.ratio = None if ratio is None else float(ratio)
        self.target_macs_cut = None if target_macs_cut is None else float(target_macs_cut)
        self.overrides = overrides
        self.include = _check_patterns(include, "include")
        self.exclude = _check_patterns(exclude, "exclude")
        self.include_frozen = include_frozen
        self.plan_input_size = plan_input_size
        self.interval, self.begin = interval, begin
        self.plan: Optional[RankPlan] = None
        self._loaded_plan: Optional[RankPlan] = None
        self._layers: List[ConvBN] = []

    # -- setup ----------------------------------------------------------------------------------
    @staticmethod
    def _unwrap(runner) -> nn.Module:
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    def before_run(self, runner) -> None:
        """Let the model load compressed checkpoints whatever its type (before the runner loads any).

        With a stock ``EncoderDecoder``, ``tools/test.py`` (or ``load_from``) on a compressed checkpoint
        then builds its factorised convs from the checkpoint's plan instead of ignoring their weights.
        """
        enable_compressed_loading_(self._unwrap(runner))

    def before_train(self, runner) -> None:
        """Pair convs with their BNs and compute (or take over from a resumed checkpoint) the plan."""
        model = self._unwrap(runner)
        if model_plan(model) is not None:
            raise ValueError(f"LRPETHook: LRPET training needs a dense model, but the model is factorised: "
                             f"load_from={runner._load_from!r} is a compressed checkpoint. Train from the dense "
                             "checkpoint it was made from (e.g. iter_N.pth), or remove LRPETHook to fine-tune the "
                             "factorised model")
        pairs, unpaired, frozen = pair_conv_bn(model, self.include, self.exclude, skip_frozen=not self.include_frozen)
        if frozen:
            runner.logger.info(f"LRPET: skipping {len(frozen)} frozen conv(s) (no gradient, projecting "
                               f"would truncate them for good): {frozen[:4]}{' ...' if len(frozen) > 4 else ''}")
        if unpaired:
            runner.logger.warning(f"LRPET: {len(unpaired)} selected conv(s) have no BatchNorm after them and are "
                                  f"projected without BN rectification: {unpaired}")
        if not pairs:
            raise ValueError(f"LRPETHook: include={self.include} exclude={self.exclude} selects no trainable conv")
        plan = build_seg_plan(model, pairs, ratio=self.ratio, target_macs_cut=self.target_macs_cut,
                              overrides=self.overrides, input_size=self.plan_input_size,
                              project_unfactorized=explicit_names(list(self.include) + list(self.overrides)))
        if self._loaded_plan is not None:
            if self._loaded_plan.ranks != plan.ranks:
                runner.logger.warning("LRPET: the plan in the resumed checkpoint differs from the one the "
                                      "current options give; keeping the checkpoint's plan")
            plan = self._loaded_plan
        self.plan = plan
        self._layers = [p for p in pairs if p.name in plan]
        missing = [n for n in plan.layers if n not in {p.name for p in self._layers}]
        if missing:
            raise ValueError(f"LRPETHook: planned layers {missing[:5]} are not selectable in this model")
        runner.logger.info("LRPET rank plan:\n" + plan.format_table())

    # -- training -------------------------------------------------------------------------------
    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        steps_done = runner.iter + 1  # runner.iter is incremented after the after_train_iter hooks
        if self.plan is None:
            return
        is_last = self.is_last_train_iter(runner)
        if not (self.every_n_train_iters(runner, self.interval) or is_last):
            return
        if not self.projector.should_project(steps_done, is_last):
            return
        # With several ranks the layers are shared out, each projected once (with rank 0's BN
        # statistics) and broadcast, so every rank ends with bit-identical weights and stats.
        summary = self.projector.project_(self._layers, self.plan, steps_done, distributed=get_world_size() > 1)
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
