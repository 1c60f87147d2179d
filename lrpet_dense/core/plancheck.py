"""A warning for extreme rank plans, given once when training starts (every framework and the plain route).

A plan is *extreme* when its first projection would keep less than ``config.warn_energy_below`` of a
planned conv's spectral energy, or when a planned conv's rank is below ``config.warn_rank_below``
(:class:`~lrpet_dense.core.LRPETConfig`; 0 turns either off). :class:`~lrpet_dense.core.LRPETSession`
checks its plan when it is made (:func:`warn_extreme_plan`); training goes on either way.

The energy is what the projection measures (:class:`~lrpet_dense.core.LayerStats` ``energy_kept``): the
share of ``sum s_i^2`` in the top ``k`` singular values of the weight, BN-folded under BN rectification,
of the weights *at planning time*. From trained weights that is what the first projection removes; from
a random initialisation it says little (a random weight's energy is spread over all its singular values,
so the share is close to the rank share ``k / m``), and the message says so.

Cheap: the top ``k`` of ``m`` singular values always hold at least ``k / m`` of the energy, so only convs
with a rank share ``k / m`` below the threshold (at the default 0.1: ratios of about 0.9 and above) have
their spectra computed (:func:`energy_kept`: one Gram matrix and its eigenvalues per conv, in the weights'
precision and on their device, as the projection does); a usual plan costs nothing. (Measured: all 61
convs of a Faster R-CNN R50-FPN at p=0.99, 1.5 s on one AMD EPYC core.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from .config import LRPETConfig
from .projection import ConvBN, bn_scale
from .rank import RankPlan

__all__ = ["ExtremePlan", "extreme_plan", "warn_extreme_plan", "energy_kept"]

logger = logging.getLogger(__name__)

#: How many conv names a warning lists.
_SHOWN = 3


@dataclass
class ExtremePlan:
    """What makes a plan extreme.

    Attributes:
        low_energy: ``{conv: energy share its first projection would keep}`` below ``warn_energy_below``.
        low_rank: ``{conv: rank}`` of the planned convs below ``warn_rank_below`` (below their full rank).
        full_ranks: ``{conv: full rank}`` of the convs named above.
        planned: the number of planned convs.
    """

    low_energy: Dict[str, float] = field(default_factory=dict)
    low_rank: Dict[str, int] = field(default_factory=dict)
    full_ranks: Dict[str, int] = field(default_factory=dict)
    planned: int = 0

    def message(self, plan: RankPlan, config: LRPETConfig) -> str:
        """The warning: the numbers, what the energy figure means, and the options that silence it."""
        parts = []
        if self.low_energy:
            worst = sorted(self.low_energy, key=self.low_energy.get)
            shown = ", ".join(f"{n!r} {self.low_energy[n]:.1%} (rank {plan[n].rank} of {self.full_ranks[n]})"
                              for n in worst[:_SHOWN])
            more = f", ... ({len(worst) - _SHOWN} more)" if len(worst) > _SHOWN else ""
            parts.append(f"the first projection would keep less than {100 * config.warn_energy_below:g}% "
                         f"(warn_energy_below) of the spectral energy of {len(worst)} of the {self.planned} "
                         f"planned convs: {shown}{more}")
        if self.low_rank:
            lowest = sorted(self.low_rank, key=lambda n: (self.low_rank[n], n))
            shown = ", ".join(f"{n!r} rank {self.low_rank[n]} of {self.full_ranks[n]}" for n in lowest[:_SHOWN])
            more = f", ... ({len(lowest) - _SHOWN} more)" if len(lowest) > _SHOWN else ""
            parts.append(f"{len(lowest)} of the {self.planned} planned convs get a rank below "
                         f"{config.warn_rank_below} (warn_rank_below): {shown}{more}")
        text = f"LRPET: an extreme rank plan (p={plan.ratio:g}): " + "; ".join(parts) + "."
        if self.low_energy:
            text += (" The energy is that of the weights now, when the plan is made (BN-folded, as the projection "
                     "sees them): from trained weights it is what the first projection removes; from a random "
                     "initialisation it says little (a random weight's energy is spread over all its singular "
                     "values, so it is close to the rank share k/m).")
        return (text + " Training goes on. If this plan is what you want, silence this warning with "
                "warn_energy_below=0 and warn_rank_below=0 (LRPETConfig / mmseg LRPETHook keywords; detectron2: "
                "LRPET.WARN_ENERGY_BELOW 0.0, LRPET.WARN_RANK_BELOW 0; a LazyConfig: lrpet.warn_energy_below=0); "
                "else plan a smaller cut or ratio.")


def energy_kept(layer: ConvBN, rank: int, config: LRPETConfig) -> float:
    """The share of the spectral energy the projection of ``layer`` onto ``rank`` would keep now (its
    ``LayerStats.energy_kept``): the top ``rank`` eigenvalues of the smaller Gram matrix of its weight,
    BN-folded under BN rectification, in the weight's precision and on its device, as the projection computes."""
    name, conv, bn = layer
    with torch.no_grad():
        w = conv.weight.detach()
        m = w.reshape(w.shape[0], -1).to(torch.float64 if w.dtype == torch.float64 else torch.float32)
        if config.bn_rectification and bn is not None:
            m = m * bn_scale(bn, name).to(m)[:, None]
        total = float(m.square().sum())
        if not total > 0:
            return 1.0  # an all-zero weight is left as it is
        ev = torch.linalg.eigvalsh(m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m).clamp_min(0)
        return min(float(ev[-rank:].sum()) / total, 1.0)


def extreme_plan(layers: Sequence[ConvBN], plan: RankPlan, config: LRPETConfig) -> Optional[ExtremePlan]:
    """What makes ``plan`` extreme for ``layers`` (the planned convs with their norms), or None.

    Only convs whose rank share ``k / m`` is below ``config.warn_energy_below`` have their spectra
    computed (the top ``k`` singular values hold at least that share of the energy).
    """
    planned = [l for l in layers if l.name in plan]
    found = ExtremePlan(planned=len(planned))
    floor = config.warn_rank_below
    share = config.warn_energy_below
    for l in planned:
        lp = plan[l.name]
        if lp.rank < min(floor, lp.full_rank):
            found.low_rank[l.name] = lp.rank
    candidates = [l.name for l in planned if plan[l.name].rank < plan[l.name].full_rank
                  and plan[l.name].rank / plan[l.name].full_rank < share]
    by_name = {l.name: l for l in planned}
    for name in candidates:
        kept = energy_kept(by_name[name], plan[name].rank, config)
        if kept < share:
            found.low_energy[name] = kept
    found.full_ranks = {n: plan[n].full_rank for n in (*found.low_energy, *found.low_rank)}
    return found if (found.low_energy or found.low_rank) else None


def warn_extreme_plan(layers: Sequence[ConvBN], plan: RankPlan, config: LRPETConfig,
                      log: Optional[logging.Logger] = None) -> Optional[ExtremePlan]:
    """Log one warning when ``plan`` is extreme (:func:`extreme_plan`); returns what was found, or None."""
    found = extreme_plan(layers, plan, config)
    if found is not None:
        (log or logger).warning(found.message(plan, config))
    return found
