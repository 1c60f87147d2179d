"""The training-time side shared by both framework hooks: when to project, and what to log.

The hooks decide *when* in their framework's terms and call :meth:`LRPETProjector.project_`;
this class does the projection, times it, and summarises it as the scalars both hooks log.

Example:
    >>> proj = LRPETProjector(interval=100)
    >>> proj.should_project(100, is_last=False), proj.should_project(150, is_last=True)
    (True, True)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .projection import ConvBN, LayerStats, project_layers_
from .rank import RankPlan

__all__ = ["LRPETProjector", "ProjectionSummary"]

logger = logging.getLogger(__name__)


@dataclass
class ProjectionSummary:
    iteration: int
    seconds: float
    stats: List[LayerStats]

    def scalars(self, prefix: str = "lrpet/") -> Dict[str, float]:
        """The per-projection scalars both hooks log (same names in detectron2 and mmengine)."""
        e = [s.energy_kept for s in self.stats]
        c = [s.rel_change for s in self.stats]
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
        interval: project after every ``interval`` optimizer steps (> 0).
        begin: no projection before this many steps have been taken. Defaults to 0.
        energy_transfer: see :func:`~lrpet_dense.core.lrpet_project`. Defaults to True.
        bn_rectification: project BN-folded weights. Defaults to True.
        ridge: ``lambda`` (>= 0). Defaults to 1e-5.
        residual: residual factor ``r`` in [0, 1]. Defaults to 0.
    """

    def __init__(self, interval: int, begin: int = 0, *, energy_transfer: bool = True,
                 bn_rectification: bool = True, ridge: float = 1e-5, residual: float = 0.0):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
            raise ValueError(f"interval must be a positive integer (steps between projections), got {interval!r}")
        if isinstance(begin, bool) or not isinstance(begin, int) or begin < 0:
            raise ValueError(f"begin must be an integer >= 0, got {begin!r}")
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge (lambda) must be a finite number >= 0, got {ridge!r}")
        if not (isinstance(residual, (int, float)) and 0.0 <= residual <= 1.0):
            raise ValueError(f"residual must lie in [0, 1], got {residual!r}")
        self.interval, self.begin = interval, begin
        self.energy_transfer, self.bn_rectification = bool(energy_transfer), bool(bn_rectification)
        self.ridge, self.residual = float(ridge), float(residual)
        self.last_iter: Optional[int] = None  # steps taken at the last projection
        self.num_projections = 0

    def should_project(self, steps_done: int, is_last: bool) -> bool:
        """Whether to project now, ``steps_done`` optimizer steps into training."""
        if steps_done < max(self.begin, 1) or steps_done == self.last_iter:
            return False
        return is_last or steps_done % self.interval == 0

    def project_(self, layers: Sequence[ConvBN], plan: RankPlan, steps_done: int) -> ProjectionSummary:
        """Project ``layers`` per ``plan`` in place (atomic) and record it."""
        t0 = time.perf_counter()
        stats = project_layers_(layers, plan, energy_transfer=self.energy_transfer,
                                bn_rectification=self.bn_rectification, ridge=self.ridge, residual=self.residual)
        summary = ProjectionSummary(steps_done, time.perf_counter() - t0, stats)
        self.last_iter = steps_done
        self.num_projections += 1
        s = summary.scalars("")
        logger.info("LRPET projection at step %d: %d layers in %.3fs, energy kept mean %.4f / worst %.4f, "
                    "weight change mean %.4f / max %.4f", steps_done, len(stats), s["time_s"],
                    s["energy_kept_mean"], s["energy_kept_min"], s["rel_change_mean"], s["rel_change_max"])
        return summary

    def state_dict(self) -> dict:
        return {"last_iter": self.last_iter, "num_projections": self.num_projections}

    def load_state_dict(self, state: dict) -> None:
        self.last_iter = state.get("last_iter")
        self.num_projections = int(state.get("num_projections", 0))
