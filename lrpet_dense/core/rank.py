"""Rank rule, layer selection and the rank plan (docs/method.md, sections 2, 4 and 5).

The plan is plain data (name -> rank, with the shapes and output sizes that justify it), so it can
be logged, saved in a checkpoint (loadable with ``torch.load(..., weights_only=True)``) and replayed
to rebuild a factorised model before its weights are loaded.

Example:
    >>> from lrpet_dense.core import LayerSpec, LRPETConfig, build_rank_plan
    >>> specs = [LayerSpec("conv1", (64, 64, 3, 3), (56, 56)), LayerSpec("conv2", (256, 64, 1, 1), (56, 56))]
    >>> plan = build_rank_plan(specs, LRPETConfig(ratio=0.25))
    >>> plan.ranks
    {'conv1': 48, 'conv2': 48}
    >>> plan2 = build_rank_plan(specs, LRPETConfig(target_macs_cut=0.3))  # solve the one ratio p for a 30% cut
    >>> plan2.reached_macs_cut >= 0.3
    True
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .config import LRPETConfig
from .macs import conv_macs, factorized_macs, factorization_saves, full_rank

__all__ = ["rank_from_ratio", "LayerSpec", "LayerPlan", "RankPlan", "build_rank_plan"]

# Ratios the MAC solver may return lie on this grid (1e-4), so they read and log cleanly.
_RATIO_GRID = 10_000


def _check_ratio(ratio: float, what: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise ValueError(f"{what} must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{what} must lie in [0, 1) (the fraction of the rank to prune), got {ratio!r}")
    return float(ratio)


def rank_from_ratio(full_rank: int, ratio: float) -> int:
    """The LRPET rank rule ``k = max(1, floor(m * (1 - p)))``, with an exact floor.

    ``p`` is read as the decimal it prints as (``repr``), so float round-off cannot flip the floor:
    ``rank_from_ratio(64, 0.25) == 48`` and ``rank_from_ratio(10, 0.1) == 9``.

    Args:
        full_rank: ``m = min(n, c*kh*kw)``, at least 1.
        ratio: rank pruning ratio ``p`` in ``[0, 1)``.

    Returns:
        The rank ``k`` in ``[1, m]``.
    """
    if isinstance(full_rank, bool) or not isinstance(full_rank, int) or full_rank < 1:
        raise ValueError(f"full_rank must be a positive integer, got {full_rank!r}")
    p = Fraction(repr(_check_ratio(ratio)))
    return max(1, math.floor(full_rank * (1 - p)))


@dataclass(frozen=True)
class LayerSpec:
    """What the planner needs to know about one conv: its name, weight shape and output size.

    Args:
        name: fully-qualified module name.
        shape: weight shape ``(n, c, kh, kw)`` (``groups == 1``).
        out_hw: spatial size of the conv's output for the planning input, or None when unknown
            (the layer then gets a rank but does not count towards the MAC objective).
    """

    name: str
    shape: Tuple[int, int, int, int]
    out_hw: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) == 2:
            shape = shape + (1, 1)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"layer {self.name!r}: weight shape must be (n, c, kh, kw), got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if self.out_hw is not None:
            object.__setattr__(self, "out_hw", tuple(int(s) for s in self.out_hw))

    @property
    def full_rank(self) -> int:
        return full_rank(self.shape)


@dataclass(frozen=True)
class LayerPlan:
    """One layer's entry in a :class:`RankPlan`."""

    name: str
    shape: Tuple[int, int, int, int]
    rank: int
    ratio: float
    out_hw: Optional[Tuple[int, int]] = None

    @property
    def full_rank(self) -> int:
        return full_rank(self.shape)

    @property
    def factorize(self) -> bool:
        """Whether two thin convs cost fewer MACs than the dense one (docs/method.md, section 5)."""
        return factorization_saves(self.shape, self.rank)

    @property
    def macs_before(self) -> Optional[int]:
        return None if self.out_hw is None else conv_macs(self.shape, self.out_hw)

    @property
    def macs_after(self) -> Optional[int]:
        if self.out_hw is None:
            return None
        if self.factorize:
            return factorized_macs(self.shape, self.rank, self.out_hw)
        return conv_macs(self.shape, self.out_hw)


@dataclass
class RankPlan:
    """Which layer gets which rank, as data.

    Attributes:
        layers: ordered mapping name -> :class:`LayerPlan`.
        ratio: the global ratio ``p`` (given or solved).
        target_macs_cut: the requested MAC cut when ``ratio`` was solved, else None.
        reference_macs: the MACs the cut is measured against (e.g. the whole backbone's convs).
    """

    layers: Dict[str, LayerPlan]
    ratio: float
    target_macs_cut: Optional[float] = None
    reference_macs: Optional[int] = None
    overrides: Dict[str, float] = field(default_factory=dict)
    #: Selected layers left out of the plan (not projected) because two thin convs would not cost fewer
    #: MACs at their rank, so projecting them would lose rank and save nothing.
    left_dense: List[str] = field(default_factory=list)
    #: ``"uniform"`` (one ratio) or ``"energy"`` (see :func:`build_rank_plan`).
    policy: str = "uniform"
    #: With a latency table: ``{"target", "reached", "dense_ms", "planned_ms"}`` (the selected convs'
    #: measured latency, summed per layer, dense and as planned).
    latency: Dict[str, Optional[float]] = field(default_factory=dict)

    # -- queries ------------------------------------------------------------------------------
    @property
    def ranks(self) -> Dict[str, int]:
        return {name: lp.rank for name, lp in self.layers.items()}

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    @property
    def macs_before(self) -> int:
        return sum(lp.macs_before or 0 for lp in self.layers.values())

    @property
    def macs_after(self) -> int:
        return sum(lp.macs_after or 0 for lp in self.layers.values())

    @property
    def reached_macs_cut(self) -> float:
        """Fraction of ``reference_macs`` (default: the planned layers' MACs) removed by the plan."""
        ref = self.reference_macs or self.macs_before
        return 0.0 if ref == 0 else (self.macs_before - self.macs_after) / ref

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data (str, int, float, list, dict, None): safe for ``weights_only`` loading and JSON."""
        return {
            "version": 1,
            "ratio": self.ratio,
            "target_macs_cut": self.target_macs_cut,
            "reference_macs": self.reference_macs,
            "overrides": dict(self.overrides),
            "left_dense": list(self.left_dense),
            "policy": self.policy,
            "latency": dict(self.latency),
            "layers": [
                {"name": lp.name, "shape": list(lp.shape), "rank": lp.rank, "ratio": lp.ratio,
                 "out_hw": None if lp.out_hw is None else list(lp.out_hw)}
                for lp in self.layers.values()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "RankPlan":
        try:
            if data.get("version") != 1:
                raise ValueError(f"unsupported plan version {data.get('version')!r}")
            layers = {}
            for e in data["layers"]:
                lp = LayerPlan(str(e["name"]), tuple(int(s) for s in e["shape"]), int(e["rank"]), float(e["ratio"]),
                               None if e.get("out_hw") is None else tuple(int(s) for s in e["out_hw"]))
                if not 1 <= lp.rank <= lp.full_rank:
                    raise ValueError(f"layer {lp.name!r}: rank {lp.rank} outside [1, {lp.full_rank}]")
                layers[lp.name] = lp
            return cls(layers, float(data["ratio"]), data.get("target_macs_cut"), data.get("reference_macs"),
                       dict(data.get("overrides") or {}), [str(n) for n in data.get("left_dense") or []],
                       str(data.get("policy") or "uniform"), dict(data.get("latency") or {}))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a valid LRPET rank plan: {e!r}") from e

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, path: str) -> "RankPlan":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def format_table(self) -> str:
        """A plain-text table (layer, shape, rank, factorised, MACs before/after) for logs."""
        head = ("layer", "shape (n,c,kh,kw)", "rank/full", "factorise", "MMACs before", "MMACs after")
        rows = []
        for lp in self.layers.values():
            mb, ma = lp.macs_before, lp.macs_after
            rows.append((lp.name, "x".join(map(str, lp.shape)), f"{lp.rank}/{lp.full_rank}",
                         "yes" if lp.factorize else "no",
                         "-" if mb is None else f"{mb / 1e6:.1f}", "-" if ma is None else f"{ma / 1e6:.1f}"))
        rows.append(("total", "", "", "", f"{self.macs_before / 1e6:.1f}", f"{self.macs_after / 1e6:.1f}"))
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths))  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        cut = (f"ratio p={self.ratio:g}" if self.policy == "uniform" else
               f"energy allocation (uniform ratio for the same cut: p={self.ratio:g})")
        cut += f"; MAC cut {self.reached_macs_cut:.1%}"
        if self.latency:
            cut += f"; measured latency cut {self.latency['reached']:.1%} (per-layer table" + (
                f", target {self.latency['target']:.1%})" if self.latency.get("target") else ")")
        if self.target_macs_cut is not None:
            cut += f" (target {self.target_macs_cut:.1%})"
        lines.append(cut)
        if self.left_dense:
            lines.append(f"left dense and not projected ({len(self.left_dense)}; two thin convs would not cost fewer "
                         f"MACs at their rank): {', '.join(self.left_dense)}")
        return "\n".join(lines)


def match_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches any of the fnmatch-style ``patterns`` (``*`` spans dots)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_names(names: Sequence[str], include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> List[str]:
    """Names matching some include pattern and no exclude pattern, in their original order.

    Raises:
        ValueError: an include pattern matches no name (a typo would otherwise silently select
            nothing).
    """
    include, exclude = list(include), list(exclude)
    for p in include:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(
                f"include pattern {p!r} matches no candidate layer; candidates look like "
                f"{list(names[:3])!r}. Fix the pattern (fnmatch syntax, '*' spans dots).")
    return [n for n in names if match_any(n, include) and not match_any(n, exclude)]


def _ratio_of(name: str, ratio: float, overrides: Mapping[str, float]) -> float:
    for pattern, r in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return r
    return ratio


def _round_rank(k: int, full: int, multiple: int) -> int:
    """``k`` rounded down to a multiple of ``multiple`` (never below it, never above ``full``)."""
    if multiple <= 1 or full <= multiple:
        return k
    return min(full, max(multiple, (k // multiple) * multiple))


def _plan_for(specs: Sequence[LayerSpec], ratio: float, overrides: Mapping[str, float],
              multiple: int = 1) -> Dict[str, LayerPlan]:
    out = {}
    for s in specs:
        r = _ratio_of(s.name, ratio, overrides)
        out[s.name] = LayerPlan(s.name, s.shape, _round_rank(rank_from_ratio(s.full_rank, r), s.full_rank, multiple),
                                r, s.out_hw)
    return out


def build_rank_plan(
    layers: Sequence[LayerSpec],
    config: Optional[LRPETConfig] = None,
    *,
    reference_macs: Optional[int] = None,
    spectra: Optional[Mapping[str, Sequence[float]]] = None,
    latency=None,
) -> RankPlan:
    """The rank of every layer: from one ratio, one ratio solved for a MAC cut, or an energy allocation.

    Uses ``config.ratio`` / ``config.target_macs_cut`` / ``config.overrides`` / ``config.rank_policy``:

    - a ratio: ``k = max(1, floor(m (1 - p)))`` for every layer (overrides set their layers' ratios);
    - ``target_macs_cut`` with ``rank_policy="uniform"``: the smallest ``p`` on a 1e-4 grid whose plan
      removes that fraction of ``reference_macs`` (the cut is monotone in ``p``), counting factorised
      MACs only where factorising saves MACs; override layers keep their ratios;
    - ``target_macs_cut`` with ``rank_policy="energy"``: per-layer ranks that keep the most spectral
      energy for the MACs removed. For a multiplier ``lam`` each layer takes the rank minimising
      ``(energy dropped / its energy) + lam * (its MACs / reference MACs)``; ``lam`` is bisected to the
      smallest value whose plan reaches the cut (a Lagrangian relaxation: every layer's MACs fall
      as ``lam`` grows). Needs ``spectra`` (the singular values the projection will see, i.e. of
      the BN-folded weights under BN rectification). Layers without an output size, whose MACs are
      not counted, get the uniform plan's ratio for the same cut.

    - ``target_latency_cut``: the smallest ``p`` (on a 0.005 grid) whose plan removes that fraction
      of the selected layers' measured latency, summed over a per-layer ``latency`` table
      (:class:`~lrpet_dense.core.latency.LatencyTable`); a layer whose factorised form at its rank is
      not measured faster than its dense form stays dense.

    Ranks are rounded down to multiples of ``config.rank_multiple``. A selected layer whose two thin
    convs would not cost fewer MACs (or, for a latency plan, time) than the dense conv at its rank
    is left out of the plan (``plan.left_dense``; not projected, it would only lose rank), unless it
    is named exactly in ``config.include`` or ``config.overrides``. With a ``latency`` table the plan
    also records its measured latency cut (``plan.latency``).

    Args:
        layers: the selected layers.
        config: the options. Defaults to ``LRPETConfig()`` (ratio 0.5).
        reference_macs: MACs the cut is a fraction of. Defaults to the MACs of ``layers`` that have
            an output size; pass e.g. the whole backbone's conv MACs to include unselected convs.
        spectra: ``{name: singular values, descending}`` for ``rank_policy="energy"``.
        latency: a per-layer latency table, required by ``target_latency_cut``; with any plan it
            adds the measured latency cut to ``plan.latency``. Defaults to None.

    Returns:
        The :class:`RankPlan`; ``plan.reached_macs_cut`` is the cut actually reached.
    """
    config = config or LRPETConfig()
    specs = list(layers)
    if not specs:
        raise ValueError("no layers to plan: the layer selection is empty")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate layer names in the plan input")
    overrides = dict(config.overrides)
    for pattern in overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"override pattern {pattern!r} matches no selected layer")
    keep = set(config.explicit_names())
    if reference_macs is None:  # all selected layers, also those left dense below
        reference_macs = sum(conv_macs(s.shape, s.out_hw) for s in specs if s.out_hw is not None) or None

    multiple = config.rank_multiple

    def stays_dense(lp: LayerPlan) -> bool:
        if not lp.factorize:
            return True
        return latency is not None and lp.name in latency.layers and \
            latency.factorized_ms(lp.name, lp.rank) >= latency.dense_ms(lp.name)

    def final(layers: Dict[str, LayerPlan], p: float, target: Optional[float]) -> RankPlan:
        dense = [n for n, lp in layers.items() if stays_dense(lp) and n not in keep]
        kept = {n: lp for n, lp in layers.items() if n not in dense}
        if not kept:
            raise ValueError(f"no selected layer would be factorised at ratio p={p:g}: two thin convs cost at least "
                             "as many MACs (or as much measured time) as each dense conv at its rank. Use a larger "
                             "ratio or another selection.")
        plan = RankPlan(kept, p, target, reference_macs, overrides, dense, config.rank_policy)
        if latency is not None:
            plan.latency = _latency_summary(latency, layers, kept, config.target_latency_cut)
        return plan

    if config.target_latency_cut is not None:
        if latency is None:
            raise ValueError("target_latency_cut needs a per-layer latency table (measured by the adapter's build_plan)")
        p = _solve_latency(specs, config.target_latency_cut, overrides, latency, multiple, stays_dense)
        return final(_plan_for(specs, p, overrides, multiple), p, None)
    target = config.target_macs_cut
    if target is None:
        ratio = config.effective_ratio
        return final(_plan_for(specs, ratio, overrides, multiple), ratio, None)
    if not any(s.out_hw is not None for s in specs):
        raise ValueError("target_macs_cut needs the layers' output sizes (LayerSpec.out_hw); none is known")
    p, uniform = _solve_uniform(specs, target, overrides, reference_macs, multiple)
    if config.rank_policy == "energy":
        return final(_energy_allocation(specs, target, overrides, reference_macs, spectra, uniform, multiple), p,
                     target)
    return final(uniform, p, target)


def _planned_ms(latency, layers: Mapping[str, LayerPlan], stays_dense) -> Tuple[float, float]:
    """``(dense ms, planned ms)`` summed over the layers the table knows."""
    dense = planned = 0.0
    for name, lp in layers.items():
        if name not in latency.layers:
            continue
        d = latency.dense_ms(name)
        dense += d
        planned += d if stays_dense(lp) else latency.factorized_ms(name, lp.rank)
    return dense, planned


def _latency_summary(latency, layers, kept, target) -> Dict[str, Optional[float]]:
    dense, planned = _planned_ms(latency, layers, lambda lp: lp.name not in kept)
    return {"target": target, "reached": (dense - planned) / dense if dense else 0.0, "dense_ms": dense,
            "planned_ms": planned}


def _solve_latency(specs, target: float, overrides, latency, multiple: int, stays_dense) -> float:
    """The smallest ratio on a 0.005 grid whose plan removes ``target`` of the measured latency."""
    for i in range(0, 200):
        p = i / 200
        dense, planned = _planned_ms(latency, _plan_for(specs, p, overrides, multiple), stays_dense)
        if dense and (dense - planned) / dense >= target:
            return p
    raise ValueError(f"target_latency_cut={target:.4f} cannot be reached: factorising the selected layers removes "
                     "less of their measured latency at any ratio. Lower the target or select more layers.")


def _solve_uniform(specs, target: float, overrides, reference_macs, multiple: int = 1) -> Tuple[float, Dict[str, LayerPlan]]:
    def cut(i: int) -> Tuple[float, Dict[str, LayerPlan]]:
        plan = RankPlan(_plan_for(specs, i / _RATIO_GRID, overrides, multiple), i / _RATIO_GRID, None, reference_macs)
        return plan.reached_macs_cut, plan.layers

    lo, hi = 0, _RATIO_GRID - 1
    best, _ = cut(hi)
    if best < target:
        raise ValueError(
            f"target_macs_cut={target:.4f} cannot be reached: the largest ratio p={hi / _RATIO_GRID} "
            f"cuts {best:.4f} of the reference MACs (layers where factorising saves nothing stay dense). "
            "Lower the target, select more layers, or remove overrides.")
    while lo < hi:  # smallest grid ratio whose cut reaches the target
        mid = (lo + hi) // 2
        c, _ = cut(mid)
        if c >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo / _RATIO_GRID, cut(lo)[1]


def _energy_allocation(specs, target: float, overrides, reference_macs, spectra, uniform,
                       multiple: int = 1) -> Dict[str, LayerPlan]:
    """Per-layer ranks of the energy policy (see :func:`build_rank_plan`)."""
    if not spectra:
        raise ValueError("rank_policy='energy' needs the layers' singular values (spectra)")
    free = [s for s in specs if s.out_hw is not None and _ratio_of(s.name, -1.0, overrides) < 0]
    missing = [s.name for s in free if s.name not in spectra]
    if missing:
        raise ValueError(f"rank_policy='energy': no singular values for {missing[:3]}")
    ref = float(reference_macs)
    fixed = {s.name: uniform[s.name] for s in specs if s not in free}  # overrides and unsized layers
    fixed_after = sum(lp.macs_after or 0 for lp in fixed.values())
    fixed_before = sum(lp.macs_before or 0 for lp in fixed.values())
    tables = []  # per free layer: energy dropped (fraction) and MACs at ranks 1..m
    for s in free:
        sv = [float(v) for v in spectra[s.name]][: s.full_rank]
        if len(sv) != s.full_rank:
            raise ValueError(f"rank_policy='energy': layer {s.name!r} has {len(sv)} singular values, expected "
                             f"{s.full_rank}")
        sq = [v * v for v in sv]
        total = sum(sq) or 1.0
        dropped, tail = [0.0] * (s.full_rank + 1), 0.0
        for k in range(s.full_rank, 0, -1):  # dropped[k] = energy beyond rank k
            dropped[k] = tail / total
            tail += sq[k - 1]
        macs = [conv_macs(s.shape, s.out_hw) if k == 0 or not factorization_saves(s.shape, k)
                else factorized_macs(s.shape, k, s.out_hw) for k in range(s.full_rank + 1)]
        candidates = sorted({_round_rank(k, s.full_rank, multiple) for k in range(1, s.full_rank + 1)})
        tables.append((s, dropped, macs, candidates))

    def choose(lam: float) -> Tuple[float, Dict[str, int]]:
        ranks, after = {}, fixed_after
        for s, dropped, macs, candidates in tables:
            k = min(candidates, key=lambda k: (dropped[k] + lam * macs[k] / ref, -k))
            ranks[s.name] = k
            after += macs[k]
        before = fixed_before + sum(conv_macs(s.shape, s.out_hw) for s, *_ in tables)
        return (before - after) / ref, ranks

    lo, hi = 0.0, 1.0
    while choose(hi)[0] < target:
        hi *= 4.0
        if hi > 1e12:
            raise ValueError(f"target_macs_cut={target:.4f} cannot be reached by the energy allocation")
    for _ in range(60):  # the smallest multiplier whose plan reaches the cut
        mid = (lo + hi) / 2
        if choose(mid)[0] >= target:
            hi = mid
        else:
            lo = mid
    _, ranks = choose(hi)
    out = {}
    for s in specs:
        if s.name in ranks:
            k = ranks[s.name]
            out[s.name] = LayerPlan(s.name, s.shape, k, round(1 - k / s.full_rank, 6), s.out_hw)
        else:
            out[s.name] = fixed[s.name]
    return out
