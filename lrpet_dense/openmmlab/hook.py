"""``LRPETHook``: LRPET projections during mmengine training, for mmseg and mmdet alike.

Usage in a config (mmseg; in an mmdet config import ``lrpet_dense.mmdet``)::

    custom_imports = dict(imports=['lrpet_dense.mmseg'], allow_failed_imports=False)
    custom_hooks = [dict(type='LRPETHook', target_macs_cut=0.3, interval=500)]
    model = dict(type='LRPETEncoderDecoder')  # mmdet: LRPETFasterRCNN, ...; to load compressed checkpoints

The hook is registered once, in mmengine's root ``HOOKS`` registry, so every OpenMMLab scope finds it.
It decides *when* in mmengine's terms (every ``interval`` iterations and after the last one, before
the ``CheckpointHook`` writes) and hands everything else to the framework-free
:class:`~lrpet_dense.core.LRPETSession` (the same session detectron2's hook and a plain PyTorch loop
drive: the schedule, the final projection, the logged scalars, the resume checks). What differs
between tasks (the plan's forward, the outputs checked, the default size) comes from the task
adapter that serves the runner's model (:func:`lrpet_dense.openmmlab.adapter.adapter_for`). Its
keywords are the fields of :class:`~lrpet_dense.core.LRPETConfig` (detectron2's ``cfg.LRPET`` keys, in
lower case), checked when the hook is built: mmengine's ``Runner`` builds its hooks right after the
model, before any data loader, optimizer, weight initialisation or checkpoint loading.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from lrpet_dense.core import LRPETConfig, LRPETSession, enable_compressed_loading_

from .adapter import CHECKPOINT_KEY, adapter_for
from .checkpoint import restore_legacy_buffers_
from .pairing import unwrap_model

__all__ = ["LRPETHook"]


def _loss_forward(model: nn.Module, data_batch) -> None:
    """A training forward (``mode='loss'``, no backward) on a loader batch: every BN a training step updates
    sees it (the segmentor's or detector's own data preprocessing first)."""
    data = model.data_preprocessor(data_batch, True)
    if isinstance(data, dict):
        model(**data, mode="loss")
    else:
        model(*data, mode="loss")


@HOOKS.register_module()
class LRPETHook(Hook):
    """Project the selected convs onto their planned rank every ``interval`` iterations.

    Args:
        **options: the fields of :class:`~lrpet_dense.core.LRPETConfig`, with its defaults:
            ``ratio`` (default 0.5) or ``target_macs_cut``, ``overrides``, ``include`` (default: every
            conv of the backbone), ``exclude``, ``include_frozen``, ``interval`` (500), ``begin``,
            ``energy_transfer``, ``bn_rectification``, ``ridge``, ``residual``, ``on_error``,
            ``plan_input_size`` (default: the crop size / test size), ``rank_policy``. detectron2's
            ``cfg.LRPET.<KEY>`` are the same options.

    Raises:
        ValueError: an unknown option or a bad value, naming the option, the value and the allowed range.
    """

    # Runs after the optimizer step, before LoggerHook (BELOW_NORMAL) logs the scalars and before
    # CheckpointHook (VERY_LOW) writes, so every checkpoint holds projected weights.
    priority = "NORMAL"
    #: the task adapter; None: the registered one that serves the runner's model (``adapter_for``). The
    #: task packages' ``LRPETHook`` subclasses fix it (for models outside the task's base classes).
    adapter = None

    def __init__(self, **options: Any) -> None:
        self.config = LRPETConfig.from_kwargs(options, who="LRPETHook")
        self.session: Optional[LRPETSession] = None
        self.resumed_state: Optional[Dict[str, Any]] = None  # loaded before the session exists
        self.loaded_without_state = False  # a checkpoint without LRPET state was loaded (load_from)

    # the session's parts, for logs and tests (None before training)
    plan = property(lambda self: None if self.session is None else self.session.plan)
    projector = property(lambda self: None if self.session is None else self.session.projector)
    layers = property(lambda self: [] if self.session is None else self.session.layers)

    # -- setup ----------------------------------------------------------------------------------
    def before_run(self, runner) -> None:
        """Let the model load compressed checkpoints whatever its type (before the runner loads any).

        With a stock ``EncoderDecoder`` / ``FasterRCNN``, ``tools/test.py`` (or ``load_from``) on a
        compressed checkpoint then builds its factorised convs from the checkpoint's plan instead of
        ignoring their weights.
        """
        enable_compressed_loading_(unwrap_model(runner.model))

    def before_train(self, runner) -> None:
        """Pair convs with their BNs and plan (a factorised model is refused), then take over the schedule
        (and plan) of a resumed checkpoint."""
        adapter = self.adapter or adapter_for(runner.model)
        input_hw = adapter.default_input_hw(adapter.unwrap(runner.model), getattr(runner, "cfg", None))
        self.session = adapter.session(runner.model, self.config, input_hw=input_hw, log=runner.logger)
        # BN statistics for the final weights (precise_bn_iters), on the runner's training data
        self.session.train_data = (runner.train_dataloader, _loss_forward)
        if self.resumed_state is not None:
            self.session.load_state_dict(self.resumed_state)
            self.resumed_state = None
        elif self.loaded_without_state:
            runner.logger.warning("LRPET: the loaded checkpoint has no 'lrpet' state (a dense or older "
                                  "checkpoint); the plan is computed afresh and projection starts from here")
        self.session.log_plan(runner.logger)

    # -- training -------------------------------------------------------------------------------
    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.session is None:
            return
        steps_done = runner.iter + 1  # runner.iter is incremented after the after_train_iter hooks
        # With several ranks the layers are shared out, each projected once (with rank 0's BN
        # statistics) and broadcast, so every rank ends with bit-identical weights and stats.
        summary = self.session.step(steps_done, is_last=self.is_last_train_iter(runner))
        if summary is None:
            return
        scalars = self.session.scalars(summary)
        # The visualizer records each projection at its own step (scalars.json, TensorBoard, ...).
        # They are not put in the message hub's scalar buffers: LoggerHook would re-log the last
        # values at every logging interval as if a projection had happened there.
        runner.visualizer.add_scalars(scalars, step=steps_done)
        runner.message_hub.update_info("lrpet/last_projection", dict(scalars, step=steps_done))
        runner.logger.info(f"LRPET projection {self.session.projector.num_projections} after iteration {steps_done}: "
                           + ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in scalars.items()))

    # -- checkpoint state -----------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Store the plan (plain data) and the projection counters under ``checkpoint['lrpet']``."""
        if self.session is not None:
            checkpoint[CHECKPOINT_KEY] = self.session.state_dict()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Keep the plan and counters for :meth:`before_train`. A checkpoint without them (a dense, older
        or compressed one) is noted; :meth:`before_train` says so when training follows (evaluating it
        with ``tools/test.py`` projects nothing and logs nothing)."""
        restore_legacy_buffers_(checkpoint)  # a checkpoint written by lrpet_dense 0.1
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            self.loaded_without_state = True
            return
        if self.session is not None:
            self.session.load_state_dict(state)
        else:
            self.resumed_state = dict(state)
