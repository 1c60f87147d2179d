"""Timing dense against factorised models, and when a measured speed-up counts as a result.

One utility for the report (``lrpet-dense report``) and the benchmarks (``benchmarks/bench_inference.py``).

**Interleaved rounds.** :func:`time_interleaved` first runs every callable ``warmup`` times, then
``rounds`` timed rounds in which every callable runs once, in turn (the order reversed every other
round). A shared machine's background load then falls on the dense and the factorised model alike,
and the two timings of one round form a pair. Timing one model's runs and then the other's lets a
change of load between the two blocks pass for a speed-up (back-to-back timings of identical models
differed by up to 12% on the project's 2-core machines). The warm-up matters on CPU: the first call of
a model creates oneDNN's primitives for each of its conv shapes (kept in oneDNN's primitive cache) and
grows the allocator's caches, so it can take several times as long as the next ones; the default of
3 warm-up calls per callable leaves those out of the timed rounds. The garbage collector is paused
during the rounds. Each callable's wall times (``time.perf_counter``; CUDA events on CUDA) and process
CPU times are kept per round, with their min, median and max.

**The noise rule** (:func:`judge_speedup`). For rounds ``i = 1..n`` with dense wall time ``d_i`` and
factorised wall time ``f_i`` (the same round), the per-round speed-up is ``r_i = d_i / f_i``; the
speed-up is ``median(r_i)``, its spread ``[min(r_i), max(r_i)]`` and its quartiles ``q1 <= q3``
(``statistics.quantiles(r, n=4, method="inclusive")``). The speed-up is **reported as a result only
when both hold**:

1. ``median(r_i) <= MACs ratio`` (``MACs(dense) / MACs(factorised)`` of the same part). The MACs
   ratio bounds what removing MACs can buy: the two models run the same kernels (the report and the
   benchmark time both in the same form), so a factorised model faster than its MACs allow is
   measuring load or warm-up, not the rank.
2. ``q3 / q1 <= MAX_QUARTILE_RATIO`` (1.25) when ``n >= 4``: the middle half of the rounds agree to
   within 25%. With one thread the rounds of a whole model agreed to about 10% on the project's
   2-core machine even with other jobs running; with two threads and other jobs taking a core,
   OpenMP's threads wait for each other and the rounds differed by several times (0.34-2.03x in one
   report there), so that their median is chance. One disturbed round does not move the quartiles
   much, so it does not flag a run.

Otherwise the speed-up is flagged as noisy (:attr:`SpeedUp.noisy`): whoever shows it prints that the
timing was too noisy, with the spread, instead of a speed-up (:meth:`SpeedUp.text`). The reason names
which case it was: the whole spread above the MACs ratio (``min(r_i) > MACs ratio``: every round says
so), the median only, or rounds that disagree. A speed-up below 1 (the factorised model slower) is a
result like any other.

Example:
    >>> from lrpet_dense.report.timing import judge_speedup
    >>> judge_speedup([10.0, 10.2, 9.9], [6.0, 6.1, 6.0], macs_ratio=2.0).text()
    '1.67x (rounds 1.65-1.67x)'
    >>> judge_speedup([10.0, 10.2, 9.9], [4.0, 4.1, 4.0], macs_ratio=2.0).noisy
    True
"""
from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["Timing", "SpeedUp", "time_interleaved", "judge_speedup", "NOISE_RULE", "MAX_QUARTILE_RATIO"]

#: The most the upper quartile of the per-round speed-ups may exceed the lower one by (noise rule 2).
MAX_QUARTILE_RATIO = 1.25

#: One line naming the rule, for reports and benchmark output.
NOISE_RULE = ("speed-up = median over the timed rounds of (dense time / factorised time) of the same round; "
              "it is not a result (the timing was too noisy, the rounds' spread is shown instead) when it is above "
              f"the MACs ratio or when the middle half of the rounds differ by more than {MAX_QUARTILE_RATIO - 1:.0%}")


@dataclass(frozen=True)
class Timing:
    """One callable's timed rounds (milliseconds), in round order.

    Attributes:
        wall_ms: wall time of each round's call.
        cpu_ms: process CPU time of each round's call (all threads; a busy machine inflates it far less
            than the wall time).
    """

    wall_ms: Tuple[float, ...]
    cpu_ms: Tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.wall_ms)

    @property
    def min_ms(self) -> float:
        return min(self.wall_ms)

    @property
    def max_ms(self) -> float:
        return max(self.wall_ms)

    @property
    def cpu_median_ms(self) -> float:
        return statistics.median(self.cpu_ms)

    def to_dict(self) -> Dict[str, object]:
        """Plain JSON data: ``median_ms``, ``min_ms``, ``max_ms``, ``cpu_median_ms``, ``times_ms``, ``cpu_ms``."""
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "max_ms": self.max_ms,
                "cpu_median_ms": self.cpu_median_ms, "times_ms": list(self.wall_ms), "cpu_ms": list(self.cpu_ms)}


def _positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def time_interleaved(fns: Mapping[str, Callable[[], object]], rounds: int = 10, warmup: int = 3, *,
                     threads: Optional[int] = None, cuda: bool = False,
                     context: Optional[Callable[[], ContextManager]] = None,
                     clock: Optional[Callable[[], float]] = None,
                     cpu_clock: Optional[Callable[[], float]] = None) -> Dict[str, Timing]:
    """Time every callable of ``fns`` in interleaved rounds (module docstring), under ``torch.inference_mode``.

    Args:
        fns: ``{name: callable}`` (e.g. ``{"dense": lambda: dense(x), "factorized": lambda: fact(x)}``);
            at least one.
        rounds: timed rounds, each calling every callable once (>= 1). Defaults to 10.
        warmup: untimed calls of each callable first, interleaved alike (>= 0). Defaults to 3.
        threads: ``torch.set_num_threads`` while timing (restored after); None keeps the current
            setting. Defaults to None.
        cuda: time each call with CUDA events (synchronised before and after) instead of ``clock``.
            Defaults to False.
        context: a factory of a context manager entered around all calls (e.g. ``torch.autocast``).
            Defaults to None.
        clock: wall clock in seconds. Defaults to None: ``time.perf_counter`` (tests pass a fake one).
        cpu_clock: process CPU clock in seconds. Defaults to None: ``time.process_time``.

    Returns:
        ``{name: Timing}`` in the order of ``fns``.

    Raises:
        ValueError: no callable, or ``rounds`` / ``warmup`` / ``threads`` out of range.
    """
    if not fns:
        raise ValueError("time_interleaved needs at least one callable to time, got none")
    _positive_int("rounds", rounds, 1)
    _positive_int("warmup", warmup, 0)
    if threads is not None:
        _positive_int("threads", threads, 1)
    clock = clock or time.perf_counter
    cpu_clock = cpu_clock or time.process_time
    names = list(fns)
    wall: Dict[str, list] = {k: [] for k in names}
    cpu: Dict[str, list] = {k: [] for k in names}
    old_threads = torch.get_num_threads()
    gc_was_enabled = gc.isenabled()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), (context() if context else contextlib.nullcontext()):
            for _ in range(warmup):
                for k in names:
                    fns[k]()
            gc.collect()
            gc.disable()
            for r in range(rounds):
                for k in (names if r % 2 == 0 else names[::-1]):
                    if cuda:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        torch.cuda.synchronize()
                        c0 = cpu_clock()
                        start.record()
                        fns[k]()
                        end.record()
                        torch.cuda.synchronize()
                        wall[k].append(float(start.elapsed_time(end)))
                        cpu[k].append((cpu_clock() - c0) * 1e3)
                        continue
                    c0, t0 = cpu_clock(), clock()
                    fns[k]()
                    wall[k].append((clock() - t0) * 1e3)
                    cpu[k].append((cpu_clock() - c0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
        torch.set_num_threads(old_threads)
    return {k: Timing(tuple(wall[k]), tuple(cpu[k])) for k in names}


@dataclass(frozen=True)
class SpeedUp:
    """A speed-up judged by the noise rule (module docstring).

    Attributes:
        value: median over the rounds of dense time / factorised time of the same round.
        low: the smallest per-round speed-up.
        high: the largest per-round speed-up.
        q1: the lower quartile of the per-round speed-ups.
        q3: the upper quartile.
        macs_ratio: MACs(dense) / MACs(factorised) of the same part.
        rounds: how many rounds the speed-up comes from.
        noisy: True when the noise rule refuses it as a result.
        reason: why it is noisy ("" when it is not).
    """

    value: float
    low: float
    high: float
    q1: float
    q3: float
    macs_ratio: float
    rounds: int
    noisy: bool
    reason: str = ""

    def text(self) -> str:
        """``"1.21x (rounds 1.15-1.30x)"``, or for a noisy one ``"too noisy (rounds 1.90-2.60x; MACs ratio 1.28x)"``."""
        spread = f"rounds {self.low:.2f}-{self.high:.2f}x"
        if self.noisy:
            return f"too noisy ({spread}; MACs ratio {self.macs_ratio:.2f}x)"
        return f"{self.value:.2f}x ({spread})"

    def to_dict(self) -> Dict[str, object]:
        return {"value": self.value, "low": self.low, "high": self.high, "q1": self.q1, "q3": self.q3,
                "macs_ratio": self.macs_ratio, "rounds": self.rounds, "noisy": self.noisy, "reason": self.reason,
                "rule": NOISE_RULE}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "SpeedUp":
        """The inverse of :meth:`to_dict` (the ``rule`` entry is informative only)."""
        try:
            return cls(float(data["value"]), float(data["low"]), float(data["high"]), float(data["q1"]),
                       float(data["q3"]), float(data["macs_ratio"]), int(data["rounds"]), bool(data["noisy"]),
                       str(data.get("reason", "")))
        except KeyError as e:
            raise ValueError(f"a judged speed-up needs value, low, high, q1, q3, macs_ratio, rounds and noisy; "
                             f"missing {e.args[0]!r} in {dict(data)}") from None


def _times(t: Union[Timing, Sequence[float]]) -> Tuple[float, ...]:
    return tuple(t.wall_ms) if isinstance(t, Timing) else tuple(float(v) for v in t)


def judge_speedup(dense: Union[Timing, Sequence[float]], factorized: Union[Timing, Sequence[float]],
                  macs_ratio: float) -> SpeedUp:
    """The speed-up of ``factorized`` over ``dense`` from their paired rounds, judged by the noise rule.

    Args:
        dense: the dense model's :class:`Timing` (or its per-round wall times).
        factorized: the factorised model's, from the same rounds (same count, same order).
        macs_ratio: MACs(dense) / MACs(factorised) of the same part (> 0).

    Returns:
        The :class:`SpeedUp` (``noisy`` when the noise rule refuses it).

    Raises:
        ValueError: no rounds, different round counts, a time or the MACs ratio not positive and finite.
    """
    d, f = _times(dense), _times(factorized)
    if not d or len(d) != len(f):
        raise ValueError(f"the dense and factorised timings must come from the same rounds (>= 1); got {len(d)} "
                         f"and {len(f)} rounds")
    for name, values in (("dense", d), ("factorised", f)):
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"{name} times must be positive and finite, got {bad[:3]}")
    if isinstance(macs_ratio, bool) or not isinstance(macs_ratio, (int, float)) or not (
            math.isfinite(macs_ratio) and macs_ratio > 0):
        raise ValueError(f"macs_ratio must be a positive finite number, got {macs_ratio!r}")
    ratios = [a / b for a, b in zip(d, f)]
    value, low, high = statistics.median(ratios), min(ratios), max(ratios)
    q1, q3 = statistics.quantiles(ratios, n=4, method="inclusive")[::2] if len(ratios) > 1 else (value, value)
    n = len(ratios)
    reason = ""
    if low > macs_ratio:
        reason = (f"every one of the {n} rounds measured a speed-up above the MACs ratio {macs_ratio:.2f}x "
                  f"({low:.2f}-{high:.2f}x): the timings measured load or warm-up, not the removed MACs")
    elif value > macs_ratio:
        reason = (f"the median speed-up {value:.2f}x over {n} rounds is above the MACs ratio "
                  f"{macs_ratio:.2f}x (rounds {low:.2f}-{high:.2f}x): the timings are too noisy to tell")
    elif n >= 4 and q3 > MAX_QUARTILE_RATIO * q1:
        reason = (f"the rounds disagree: the middle half of the {n} rounds' speed-ups spans {q1:.2f}-{q3:.2f}x "
                  f"(more than {MAX_QUARTILE_RATIO - 1:.0%} apart; all rounds {low:.2f}-{high:.2f}x), so their "
                  f"median {value:.2f}x is chance")
    return SpeedUp(value, low, high, q1, q3, float(macs_ratio), n, bool(reason), reason)
