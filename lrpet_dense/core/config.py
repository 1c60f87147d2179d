"""``LRPETConfig``: every LRPET option, with its default and its check, in one frozen object.

The core takes it (:func:`~lrpet_dense.core.build_rank_plan`, :func:`~lrpet_dense.core.lrpet_project`,
:func:`~lrpet_dense.core.project_`, :class:`~lrpet_dense.core.LRPETProjector`); the frameworks map
onto it one to one: detectron2's ``cfg.LRPET.<KEY>`` is field ``<key>`` (upper case), mmseg's
``LRPETHook(<key>=...)`` is field ``<key>``. Defaults are written here and nowhere else.

Example:
    >>> from lrpet_dense.core import LRPETConfig
    >>> LRPETConfig(target_macs_cut=0.3).interval
    500
    >>> LRPETConfig(ratio=1.5)
    Traceback (most recent call last):
    ...
    ValueError: ratio must lie in [0, 1) (the fraction of the rank to prune), got 1.5
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["LRPETConfig", "ON_ERROR_CHOICES", "RANK_POLICIES"]

#: What training does when a projection fails: stop with the error, or log it and go on.
ON_ERROR_CHOICES = ("raise", "skip")
#: How ranks are chosen: one ratio p for every layer (the paper), or the allocation that keeps the
#: most spectral energy per MAC removed (computed from the weights; see ``lrpet_dense.core.rank``).
RANK_POLICIES = ("uniform", "energy")

#: The ratio used when neither ``ratio`` nor ``target_macs_cut`` is given.
DEFAULT_RATIO = 0.5


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _fraction(value: Any, what: str, allowed: str, ok) -> float:
    if not _is_number(value) or not ok(value):
        raise ValueError(f"{what} must {allowed}, got {value!r}")
    return float(value)


def _patterns(value: Any, what: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{what} must be a list of non-empty fnmatch patterns (str), got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class LRPETConfig:
    """The options of LRPET training, projection and planning (validated on construction).

    Args:
        ratio: one rank pruning ratio ``p`` in ``[0, 1)``: ``k = max(1, floor(m * (1 - p)))``.
            Defaults to None: 0.5 unless ``target_macs_cut`` is given (giving both is an error).
        target_macs_cut: fraction in ``(0, 1)`` of the backbone's conv MACs to remove; the planner
            solves the ratio for it. None or 0 = off. Defaults to None.
        overrides: ``{fnmatch pattern: ratio}`` per-layer ratios (first match wins). Defaults to none.
        include: fnmatch patterns of conv names to project (``*`` spans dots). Defaults to () = the
            framework's default (every trained conv of the backbone).
        exclude: fnmatch patterns of conv names never to project. Defaults to ().
        include_frozen: also project convs whose weights are frozen (no gradient: a one-shot
            truncation they cannot recover from). Defaults to False.
        interval: project after every ``interval`` optimizer steps (and always after the last one).
            Defaults to 500 (the paper's ImageNet schedule).
        begin: no projection before this many steps. Defaults to 0.
        energy_transfer: rescale the kept singular values so the (BN-folded) weight keeps its
            Frobenius norm (ET). Defaults to True.
        bn_rectification: project the BN-folded weight, with running statistics (BNR). Defaults to True.
        ridge: ``lambda >= 0`` of the BN-rectified recovery ``W' = a / (a^2 + lambda) * M'``.
            Defaults to 1e-5.
        residual: residual factor ``r`` in ``[0, 1]`` kept on the dropped singular values (the official
            code's option; 0 is the paper's formula). Defaults to 0.
        on_error: when a projection fails (nothing is changed either way): ``"raise"`` stops training,
            ``"skip"`` logs it and training goes on. Defaults to ``"raise"``.
        plan_input_size: ``(H, W)`` of the dummy input that measures conv output sizes for the MAC
            plan. Defaults to None: the framework's test / crop size.
        rank_policy: ``"uniform"`` (one ratio ``p`` for every layer, the paper's) or ``"energy"``
            (per-layer ranks that keep the most spectral energy per MAC removed, for the same MAC cut;
            needs ``target_macs_cut``). Defaults to ``"uniform"``.
        rank_multiple: round every rank down to a multiple of this (8 or 16 suit SIMD widths and
            GPU tiles; never below it, never above the full rank). Defaults to 1 (no rounding).
        target_latency_cut: fraction in ``(0, 1)`` of the selected convs' *measured* latency to remove
            (instead of a MAC cut): the ratio is solved on a per-layer latency table, and layers whose
            factorised form is not measured faster stay dense. None = off. Defaults to None.
        latency_table: a JSON file caching the per-layer latency table (measured where missing or
            stale, on the device the plan is built on). Defaults to None (measured, not cached).
        rank_warmup: steps over which the projections' ranks shrink linearly from full rank to the
            plan's (a projection after ``s < rank_warmup`` steps keeps
            ``k + floor((m - k) * (1 - s / rank_warmup))`` of ``m``); the final projection always uses
            the plan's ranks. Defaults to 0 (the plan's ranks from the first projection, the paper's).
        precise_bn_iters: after the final projection, recompute the running statistics of the
            model's trainable BatchNorm layers on this many training batches, so the saved model's BN
            statistics belong to its final low-rank weights (:func:`~lrpet_dense.core.bn.recalibrate_bn_`).
            0 = off. Defaults to 200 (detectron2's ``TEST.PRECISE_BN.NUM_ITER``).
        warn_energy_below: warn (once, when training starts) when the first projection would keep less
            than this share of a planned conv's spectral energy (its BN-folded weight at planning time;
            :mod:`lrpet_dense.core.plancheck`); in ``[0, 1)``, 0 = off. Defaults to 0.1.
        warn_rank_below: warn (likewise) when a planned conv's rank is below this; an integer >= 0,
            0 = off. Defaults to 4.
    """

    ratio: Optional[float] = None
    target_macs_cut: Optional[float] = None
    overrides: Mapping[str, float] = field(default_factory=dict)
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    include_frozen: bool = False
    interval: int = 500
    begin: int = 0
    energy_transfer: bool = True
    bn_rectification: bool = True
    ridge: float = 1e-5
    residual: float = 0.0
    on_error: str = "raise"
    plan_input_size: Optional[Tuple[int, int]] = None
    rank_policy: str = "uniform"
    rank_multiple: int = 1
    target_latency_cut: Optional[float] = None
    latency_table: Optional[str] = None
    rank_warmup: int = 0
    precise_bn_iters: int = 200
    warn_energy_below: float = 0.1
    warn_rank_below: int = 4

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.ratio is not None:
            set_("ratio", _fraction(self.ratio, "ratio", "lie in [0, 1) (the fraction of the rank to prune)",
                                    lambda v: 0 <= v < 1))
        for name, of in (("target_macs_cut", "the backbone's conv MACs"), ("target_latency_cut", "the measured latency")):
            cut = getattr(self, name)
            off = cut is None or (_is_number(cut) and cut == 0)
            set_(name, None if off else _fraction(cut, name, f"lie in (0, 1) (a fraction of {of}), or be None/0 for off",
                                                  lambda v: 0 < v < 1))
        given = [n for n in ("ratio", "target_macs_cut", "target_latency_cut") if getattr(self, n) is not None]
        if len(given) > 1:
            values = ", ".join(f"{n} ({getattr(self, n)})" for n in given)
            raise ValueError(f"give one of {values}, not several: the ratio is solved for a MAC or latency cut")
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must map fnmatch patterns to ratios, got {self.overrides!r}")
        overrides = {}
        for pattern, r in self.overrides.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"overrides: a pattern must be a non-empty string, got {pattern!r}")
            overrides[pattern] = _fraction(r, f"overrides[{pattern!r}]", "be a ratio in [0, 1)", lambda v: 0 <= v < 1)
        set_("overrides", _FrozenDict(overrides))
        set_("include", _patterns(self.include, "include"))
        set_("exclude", _patterns(self.exclude, "exclude"))
        for name in ("include_frozen", "energy_transfer", "bn_rectification"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, low, what in (("interval", 1, "steps between projections"),
                                ("begin", 0, "steps before the first projection"),
                                ("rank_warmup", 0, "steps over which the ranks shrink to the plan's; 0 = off"),
                                ("precise_bn_iters", 0, "training batches for the BN statistics after the final "
                                                        "projection; 0 = off")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low} ({what}), got {v!r}")
        set_("ridge", _fraction(self.ridge, "ridge (lambda)", "be a finite number >= 0", lambda v: v >= 0))
        set_("residual", _fraction(self.residual, "residual", "lie in [0, 1]", lambda v: 0 <= v <= 1))
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES} (stop training, or log and go on), "
                             f"got {self.on_error!r}")
        if self.plan_input_size is not None:
            size = self.plan_input_size
            size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
                raise ValueError(f"plan_input_size must be an int or (H, W) of positive ints, got {self.plan_input_size!r}")
            set_("plan_input_size", (int(size[0]), int(size[1])))
        if self.rank_policy not in RANK_POLICIES:
            raise ValueError(f"rank_policy must be one of {RANK_POLICIES}, got {self.rank_policy!r}")
        if self.rank_policy == "energy" and self.target_macs_cut is None:
            raise ValueError("rank_policy='energy' allocates ranks for a MAC cut: give target_macs_cut")
        m = self.rank_multiple
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"rank_multiple must be an integer >= 1, got {m!r}")
        if self.latency_table is not None and (not isinstance(self.latency_table, str) or not self.latency_table):
            raise ValueError(f"latency_table must be a file path, got {self.latency_table!r}")
        set_("warn_energy_below", _fraction(self.warn_energy_below, "warn_energy_below",
                                            "lie in [0, 1) (a share of a conv's spectral energy; 0 = no warning)",
                                            lambda v: 0 <= v < 1))
        v = self.warn_rank_below
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"warn_rank_below must be an integer >= 0 (a rank; 0 = no warning), got {v!r}")

    # -- derived ------------------------------------------------------------------------------------
    @property
    def effective_ratio(self) -> Optional[float]:
        """The one ratio used when no cut is solved for (``ratio``, else 0.5); None with a target."""
        if self.target_macs_cut is not None or self.target_latency_cut is not None:
            return None
        return DEFAULT_RATIO if self.ratio is None else self.ratio

    def explicit_names(self) -> Tuple[str, ...]:
        """Layers asked for by name (patterns without wildcards in ``include`` or ``overrides``)."""
        return tuple(p for p in (*self.include, *self.overrides) if not any(c in p for c in "*?["))

    def projection_options(self) -> Dict[str, Any]:
        """The options one projection of one layer takes."""
        return {"energy_transfer": self.energy_transfer, "ridge": self.ridge, "residual": self.residual}

    def replace(self, **changes: Any) -> "LRPETConfig":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (for logs, checkpoints and JSON)."""
        out = dataclasses.asdict(self)
        out["overrides"] = dict(self.overrides)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        out["plan_input_size"] = None if self.plan_input_size is None else list(self.plan_input_size)
        return out

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any], who: str = "",
                    display: Optional[Callable[[str], str]] = None, hint: str = "") -> "LRPETConfig":
        """Build from keyword options; errors name the option as the user wrote it.

        Args:
            options: ``{field: value}``.
            who: prefix of every error (e.g. ``"LRPETHook"``).
            display: how a field is spelled where the user set it (e.g. ``"cfg.LRPET.RATIO"``).
            hint: appended to every error (e.g. where to fix it).
        """
        known = cls.field_names()
        shown = display or (lambda name: name)
        prefix = f"{who}: " if who else ""
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{prefix}unknown option(s) {[shown(u) for u in unknown]}; the options are "
                             f"{[shown(k) for k in known]}")
        try:
            return cls(**options)
        except ValueError as e:
            message = str(e)
            for name in sorted(known, key=len, reverse=True):  # "ridge (lambda) must ..." -> "cfg.LRPET.RIDGE ..."
                if message.startswith(name):
                    message = shown(name) + message[len(name):]
                    break
            raise ValueError(f"{prefix}{message}{hint}") from None

    @staticmethod
    def field_names() -> Sequence[str]:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(LRPETConfig)]


class _FrozenDict(dict):
    """A read-only dict (``LRPETConfig.overrides``), hashable so the config stays hashable."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("LRPETConfig.overrides is read-only; use config.replace(overrides=...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):
        return dict, (dict(self),)
