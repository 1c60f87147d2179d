"""``LRPETSession``: the training-time side of LRPET, written once for every training loop.

A session holds a model's selected layers, their rank plan and the options, and decides, once per
optimizer step, whether to project (every ``interval`` steps from ``begin`` on, and after the last
step). A plain PyTorch loop calls :meth:`LRPETSession.step` after each ``optimizer.step()`` and
:meth:`LRPETSession.finish` at the end; the framework hooks (detectron2's ``HookBase``, mmengine's
``Hook``) are thin wrappers that call the same methods with their trainer's step counter, log
:meth:`LRPETSession.scalars` with their framework's logger and store :meth:`LRPETSession.state_dict`
in their checkpoints, so when and what to project, the final projection, the logged scalars and
the resume checks are the same everywhere.

After the final projection the session recomputes the BN statistics for the final weights
(``config.precise_bn_iters`` training batches, :func:`~lrpet_dense.core.recalibrate_bn_`) when the
training loop supplied its training data as :attr:`LRPETSession.train_data` (both framework hooks do;
a plain loop passes it to :func:`~lrpet_dense.core.prepare`), then runs its
:attr:`LRPETSession.final_steps` (callables taking the session), in order: the place for more
end-of-training work on the projected weights.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lrpet_dense.core import ConvBN, LRPETConfig, LRPETSession, build_rank_plan
    >>> from lrpet_dense.core.selection import layer_specs
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16))
    >>> layers = [ConvBN("0", model[0], model[1])]
    >>> plan = build_rank_plan(layer_specs(layers, {"0": (8, 8)}), LRPETConfig(ratio=0.5))
    >>> session = LRPETSession(model, layers, plan, LRPETConfig(interval=2), total_steps=3)
    >>> [session.step() is not None for _ in range(3)]  # projected after steps 2 and 3 (the last)
    [False, True, True]
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from .config import LRPETConfig
from .factorize import model_plan
from .plancheck import warn_extreme_plan
from .projection import ConvBN
from .rank import RankPlan
from .schedule import LRPETProjector, ProjectionSummary

__all__ = ["LRPETSession"]

logger = logging.getLogger(__name__)

FACTORIZED_MODEL_ERROR = (
    "LRPET training needs a dense model, but the model is factorised: it was built from, or loaded, a compressed "
    "(factorised) checkpoint (detectron2: MODEL.WEIGHTS / train.init_checkpoint; mmseg: load_from). Train from the "
    "dense checkpoint it was made from (e.g. model_final.pth, iter_N.pth), or fine-tune the factorised model "
    "without LRPET (detectron2: LRPET.ENABLED False; mmseg: without LRPETHook)")


def _shape4(shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    return shape + (1,) * (4 - len(shape))


class LRPETSession:
    """LRPET projections of one training run: the selected layers, the plan, the schedule.

    Args:
        model: the dense model being trained (unwrapped: not a DDP wrapper). A factorised model is
            refused: LRPET trains the dense weights.
        layers: the selected ``(name, conv, bn)`` triples (a :class:`~lrpet_dense.core.Pairing`'s
            ``layers``); the plan's layers are projected, the others are kept for resume checks.
        plan: the rank plan; every planned layer must be among ``layers``, with the plan's shape.
        config: the schedule (``interval``, ``begin``, ``on_error``) and projection options.
        total_steps: the number of optimizer steps of the run, when known: :meth:`step` then projects
            after the last one by itself. Defaults to None (call :meth:`finish` at the end).
        log: where the warning about an extreme plan goes (e.g. a framework's logger). Defaults to None:
            ``lrpet_dense.core.plancheck``'s logger.

    An extreme plan (the first projection would keep less than ``config.warn_energy_below`` of a planned
    conv's energy, or ranks below ``config.warn_rank_below``) is warned about once, here
    (:mod:`lrpet_dense.core.plancheck`).

    Raises:
        ValueError: the model is factorised, or the plan does not fit ``layers``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[ConvBN], plan: RankPlan, config: LRPETConfig, *,
                 total_steps: Optional[int] = None, log: Optional[logging.Logger] = None):
        if not isinstance(config, LRPETConfig):
            raise TypeError(f"LRPETSession takes an LRPETConfig, got {type(config).__name__}")
        if not isinstance(plan, RankPlan):
            raise TypeError(f"LRPETSession takes a RankPlan, got {type(plan).__name__}")
        if model_plan(model) is not None:
            raise ValueError(FACTORIZED_MODEL_ERROR)
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}")
        self.model = model
        self.config = config
        self.selected: List[ConvBN] = list(layers)
        self._check_plan(plan, "the rank plan")
        self.plan = plan
        warn_extreme_plan(self.layers, plan, config, log)  # once: a plan keeping too little energy, or tiny ranks
        self.projector = LRPETProjector(config)
        self.total_steps = total_steps
        self.steps_done = 0
        #: Callables ``fn(session)`` run once, in order, right after the final projection (and the BN
        #: recalibration).
        self.final_steps: List[Callable[["LRPETSession"], Any]] = []
        #: ``(batches, forward)``: training batches (e.g. the training data loader) and ``forward(model,
        #: batch)``, the model's training-mode forward on one, where the training loop can supply them: the
        #: BN statistics are recomputed on them after the final projection (``config.precise_bn_iters``).
        #: None: they are not (said once in the log when ``precise_bn_iters`` asks for it).
        self.train_data: Optional[Tuple[Iterable[Any], Callable[[nn.Module, Any], Any]]] = None
        #: Where the session's own messages go (a framework hook sets its runner's logger).
        self.log: logging.Logger = log or logger
        self.finished = False

    # -- the plan ---------------------------------------------------------------------------------
    @property
    def layers(self) -> List[ConvBN]:
        """The planned layers (those projected), in model order."""
        return [l for l in self.selected if l.name in self.plan]

    def _check_plan(self, plan: RankPlan, what: str) -> None:
        shapes = {l.name: _shape4(l.conv.weight.shape) for l in self.selected}
        missing = [n for n in plan.layers if n not in shapes]
        if missing:
            raise ValueError(f"{what} names {len(missing)} layer(s) that are not selected in this model: {missing[:5]}. "
                             "Use the config (selection, model) the plan was made with")
        bad = [f"{n} {shapes[n]} vs {lp.shape}" for n, lp in plan.layers.items() if shapes[n] != tuple(lp.shape)]
        if bad:
            raise ValueError(f"{what} does not fit this model: layer(s) of another shape ({bad[:3]}). Use the config "
                             "(model) the plan was made with")

    def log_plan(self, log: Optional[logging.Logger] = None) -> None:
        """Log the plan's table and the schedule."""
        (log or logger).info(
            "LRPET rank plan (%d layers; projection every %d steps from step %d and after the last step; ET=%s, "
            "BNR=%s):\n%s", len(self.plan), self.config.interval, self.config.begin, self.config.energy_transfer,
            self.config.bn_rectification, self.plan.format_table())

    # -- training -----------------------------------------------------------------------------------
    def should_project(self, steps_done: int, is_last: bool = False) -> bool:
        """Whether to project after ``steps_done`` optimizer steps (see :class:`~lrpet_dense.core.LRPETProjector`)."""
        return self.projector.should_project(steps_done, is_last)

    def project(self, steps_done: Optional[int] = None, *, final: bool = False) -> ProjectionSummary:
        """Project the planned layers now, in place (atomic; shared over ranks in a distributed job).

        ``final``: the projection after the last step, always at the plan's ranks (during a
        ``rank_warmup`` earlier projections use larger ranks)."""
        return self.projector.project_(self.layers, self.plan, self.steps_done if steps_done is None else steps_done,
                                       final=final)

    def step(self, steps_done: Optional[int] = None, *, is_last: Optional[bool] = None) -> Optional[ProjectionSummary]:
        """Call once after every optimizer step: projects when the schedule says so.

        In a distributed job every rank must call it (the projection is shared).

        Args:
            steps_done: optimizer steps taken so far (a trainer's counter). Defaults to None: this
                session counts the calls.
            is_last: whether this was the last step; the final projection and :attr:`final_steps`
                follow it. Defaults to None: ``steps_done >= total_steps`` when ``total_steps`` is known.

        Returns:
            The projection's summary, or None when no projection was due.
        """
        self.steps_done = self.steps_done + 1 if steps_done is None else int(steps_done)
        if is_last is None:
            is_last = self.total_steps is not None and self.steps_done >= self.total_steps
        summary = self.project(final=is_last) if self.should_project(self.steps_done, is_last) else None
        if is_last:
            self._run_final_steps(summary)
        return summary

    def finish(self) -> Optional[ProjectionSummary]:
        """End of training: the final projection (unless the last step already had it), then :attr:`final_steps`.

        Idempotent; a training loop that gave ``total_steps`` or ``is_last`` need not call it.
        Returns the final projection's summary, or None when there was nothing left to do.
        """
        summary = None
        if self.steps_done >= 1 and self.projector.last_iter != self.steps_done:
            summary = self.project(final=True)
        self._run_final_steps(summary)
        return summary

    def _run_final_steps(self, summary: Optional[ProjectionSummary]) -> None:
        if self.finished:
            return
        self.finished = True
        if summary is None or summary.error is None:  # not after a failed (skipped) final projection
            self._recalibrate_bn()
        for fn in self.final_steps:
            fn(self)

    def _recalibrate_bn(self) -> None:
        if self.config.precise_bn_iters == 0:
            return
        if self.train_data is None:
            self.log.info("LRPET: BN statistics are not recomputed after the final projection (precise_bn_iters=%d): "
                          "the training loop supplied no training data (LRPETSession.train_data)",
                          self.config.precise_bn_iters)
            return
        batches, forward = self.train_data
        done = self.projector.recalibrate_bn_(self.model, batches, forward, self.steps_done)
        if done is not None:
            self.log.info("LRPET: BN recalibration after the final projection: running statistics of %d BatchNorm "
                          "layers recomputed from %d training batches (precise_bn_iters)", done.num_layers,
                          done.num_batches)

    def scalars(self, summary: ProjectionSummary, prefix: str = "lrpet/") -> Dict[str, float]:
        """The scalars every hook logs for one projection (the summary's and ``num_projections``)."""
        out = summary.scalars(prefix)
        out[prefix + "num_projections"] = float(self.projector.num_projections)
        return out

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain data (loadable with ``torch.load(weights_only=True)``): the plan, the counters, the steps."""
        return {"plan": self.plan.to_dict(), "projector": self.projector.state_dict(), "steps_done": self.steps_done}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue a run: its plan (checked against this model's selected layers) and schedule.

        A plan that differs from the one computed now (e.g. other options) is kept, with a warning, so
        the resumed run matches the original. A state without the counters (an older checkpoint) is
        ignored with a warning.

        Raises:
            ValueError: the saved plan names layers that are not selected here, or of another shape.
        """
        if not isinstance(state, dict) or "projector" not in state:
            logger.warning("LRPET: the checkpoint has no LRPET schedule state; the schedule starts afresh")
            return
        if state.get("plan") is not None:
            saved = RankPlan.from_dict(state["plan"])
            if saved.ranks != self.plan.ranks:
                self._check_plan(saved, "the checkpoint's LRPET plan")
                logger.warning("LRPET: the checkpoint's rank plan differs from the one computed from the options; "
                               "continuing with the checkpoint's plan so the resumed run matches the original")
                self.plan = saved
        self.projector.load_state_dict(state["projector"])
        self.steps_done = int(state.get("steps_done", self.projector.last_iter or 0))
        logger.info("LRPET: resumed schedule state %s", state["projector"])
