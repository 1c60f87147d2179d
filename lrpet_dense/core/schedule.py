"""The training-time side shared by both framework hooks: when to project, and what to log.

The hooks decide *when* in their framework's terms and call :meth:`LRPETProjector.project_`;
this class does the projection, times it, and summarises it as the scalars both hooks log.

Example:
    >>> from lrpet_dense.core import LRPETConfig
    >>> proj = LRPETProjector(LRPETConfig(interval=100))
    >>> proj.should_project(100, is_last=False), proj.should_project(150, is_last=True)
    (True, True)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from torch import nn

from .bn import RecalibrationResult, recalibrate_bn_
from .config import LRPETConfig
from .distributed import project_
from .projection import ConvBN, LayerStats
from .rank import RankPlan

__all__ = ["LRPETProjector", "ProjectionSummary", "ProjectionError"]

logger = logging.getLogger(__name__)


class ProjectionError(RuntimeError):
    """A projection failed (``on_error='raise'``); no layer was changed.

    Attributes:
        iteration: optimizer steps taken when the projection was attempted.
    """

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration


@dataclass
class ProjectionSummary:
    """What one projection did (``error`` set and ``stats`` empty when it failed and was skipped)."""

    iteration: int
    seconds: float
    stats: List[LayerStats]
    error: Optional[str] = None

    def scalars(self, prefix: str = "lrpet/") -> Dict[str, float]:
        """The per-projection scalars both hooks log (same names in detectron2 and mmengine).

        A skipped failed projection logs only ``failed`` (1.0) and ``time_s``.
        """
        if self.error is not None:
            return {prefix + "time_s": self.seconds, prefix + "failed": 1.0}
        # No layer below full rank yet (early in a rank warm-up): nothing lost, nothing changed.
        e = [s.energy_kept for s in self.stats] or [1.0]
        c = [s.rel_change for s in self.stats] or [0.0]
        return {
            prefix + "time_s": self.seconds,
            prefix + "energy_kept_mean": sum(e) / len(e),
            prefix + "energy_kept_min": min(e),
            prefix + "rel_change_mean": sum(c) / len(c),
            prefix + "rel_change_max": max(c),
        }


class LRPETProjector:
    """Schedule and options of LRPET projections during training.

    Args:
        config: ``interval``, ``begin``, ``on_error`` and the projection options come from it.
            ``on_error='raise'`` stops training with a :class:`ProjectionError` naming the layer and
            the step when a projection fails (e.g. NaN/Inf weights of a diverged run); ``'skip'``
            logs the same message and training goes on with the weights as they were (the next
            scheduled projection tries again). No layer is changed either way.
    """

    def __init__(self, config: LRPETConfig):
        if not isinstance(config, LRPETConfig):
            raise TypeError(f"LRPETProjector takes an LRPETConfig, got {type(config).__name__}")
        self.config = config
        self.num_failed = 0  # skipped failures in this process (not checkpointed)
        self.last_iter: Optional[int] = None  # steps taken at the last projection
        self.num_projections = 0

    interval = property(lambda self: self.config.interval)
    begin = property(lambda self: self.config.begin)

    def should_project(self, steps_done: int, is_last: bool) -> bool:
        """Whether to project now, ``steps_done`` optimizer steps into training (every ``interval``
        steps from ``begin`` on, and after the last step; never twice at one step)."""
        if steps_done < max(self.begin, 1) or steps_done == self.last_iter:
            return False
        return is_last or steps_done % self.interval == 0

    def ranks_at(self, plan: RankPlan, steps_done: int, final: bool = False) -> Union[RankPlan, Mapping[str, int]]:
        """The ranks a projection after ``steps_done`` steps uses: ``plan``, or during ``rank_warmup``
        ranks between full and planned (layers still at full rank are left out: nothing to project)."""
        warmup = self.config.rank_warmup
        if final or warmup == 0 or steps_done >= warmup:
            return plan
        keep = 1.0 - steps_done / warmup
        ranks = {name: lp.rank + int((lp.full_rank - lp.rank) * keep) for name, lp in plan.layers.items()}
        return {name: k for name, k in ranks.items() if k < plan[name].full_rank}

    def project_(self, layers: Sequence[ConvBN], plan: RankPlan, steps_done: int,
                 final: bool = False) -> ProjectionSummary:
        """Project ``layers`` per ``plan`` in place (atomic) and record it.

        In a distributed job every rank must call this (the work is shared and every rank ends with
        the same weights and stats; :func:`~lrpet_dense.core.project_`).

        Args:
            layers: ``(name, conv, bn)`` triples.
            plan: the rank plan.
            steps_done: optimizer steps taken so far.
            final: the projection after the last step (always at the plan's ranks). Defaults to False.
        """
        t0 = time.perf_counter()
        try:
            stats = project_(layers, self.ranks_at(plan, steps_done, final), self.config)
        except Exception as e:  # the projection is atomic: no layer was changed
            message = (f"LRPET projection after step {steps_done} failed and changed no layer: "
                       f"{type(e).__name__}: {e}")
            if self.config.on_error == "raise":
                raise ProjectionError(message + ". Training stops (on_error='raise'); fix the cause (for NaN/Inf "
                                      "weights: a lower learning rate, gradient clipping, or resume from an "
                                      "earlier checkpoint), or set on_error='skip' to train on without this "
                                      "projection.", steps_done) from e
            self.last_iter = steps_done  # no retry at this step; the next scheduled one tries again
            self.num_failed += 1
            logger.error("%s. Skipped (on_error='skip'): training goes on with the weights as they were.", message)
            return ProjectionSummary(steps_done, time.perf_counter() - t0, [], error=message)
        summary = ProjectionSummary(steps_done, time.perf_counter() - t0, stats)
        self.last_iter = steps_done
        self.num_projections += 1
        s = summary.scalars("")
        logger.info("LRPET projection at step %d: %d layers in %.3fs, energy kept mean %.4f / worst %.4f, "
                    "weight change mean %.4f / max %.4f", steps_done, len(stats), s["time_s"],
                    s["energy_kept_mean"], s["energy_kept_min"], s["rel_change_mean"], s["rel_change_max"])
        return summary

    def recalibrate_bn_(self, model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
                        steps_done: int) -> Optional[RecalibrationResult]:
        """After the final projection: recompute ``model``'s BN statistics on ``config.precise_bn_iters``
        training batches (:func:`~lrpet_dense.core.bn.recalibrate_bn_`; nothing when it is 0).

        A failure changes no statistic; it stops training (``on_error='raise'``) or is logged (``'skip'``).
        In a distributed job every rank must call this.
        """
        n = self.config.precise_bn_iters
        if n == 0:
            return None
        try:
            return recalibrate_bn_(model, batches, forward, n)
        except Exception as e:
            message = (f"LRPET: recomputing the BN statistics after the final projection (step {steps_done}) "
                       f"failed and changed none: {type(e).__name__}: {e}")
            if self.config.on_error == "raise":
                raise ProjectionError(message + ". Set precise_bn_iters=0 to save the model without it.",
                                      steps_done) from e
            logger.error("%s. Skipped (on_error='skip').", message)
            return None

    def state_dict(self) -> dict:
        return {"last_iter": self.last_iter, "num_projections": self.num_projections}

    def load_state_dict(self, state: dict) -> None:
        self.last_iter = state.get("last_iter")
        self.num_projections = int(state.get("num_projections", 0))
