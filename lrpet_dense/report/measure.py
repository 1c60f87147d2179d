"""Framework-free measurements for the report: CPU latency and weight spectra (torch only)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["measure_latency", "singular_values", "spectra_layers", "initial_weights_match", "check_same_plan",
           "factorized_layer_names", "latency_section", "spectra_section", "history_section"]


def measure_latency(fn: Callable[[], object], repeats: int = 10, warmup: int = 2,
                    threads: Optional[int] = None) -> Dict[str, object]:
    """Wall time of ``fn()`` under ``torch.no_grad``: median of ``repeats`` runs after ``warmup`` runs.

    Args:
        fn: the forward to time (e.g. ``lambda: model(inputs)``).
        repeats: timed runs (>= 1). Defaults to 10.
        warmup: untimed runs first (>= 0). Defaults to 2.
        threads: ``torch.set_num_threads`` for the measurement (restored after); None keeps the
            current setting. Defaults to None.

    Returns:
        ``{"median_ms", "min_ms", "times_ms": [...], "repeats", "warmup", "threads"}``.

    Example:
        >>> measure_latency(lambda: torch.ones(4) * 2, repeats=3)["repeats"]
        3
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        times = []
        with torch.no_grad():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times, "repeats": repeats,
            "warmup": warmup, "threads": used}


def singular_values(weight: torch.Tensor) -> List[float]:
    """Singular values (descending) of a conv weight viewed as ``n x (c*kh*kw)`` (METHOD.md section 1)."""
    w = weight.detach().reshape(weight.shape[0], -1).double().cpu()
    return torch.linalg.svdvals(w).tolist()


def spectra_layers(names: Sequence[str], count: int = 4) -> List[str]:
    """``count`` layers spread evenly over ``names`` (first and last included), for the spectra figure."""
    names = list(names)
    if count >= len(names):
        return names
    if count <= 1:
        return names[:1]
    idx = sorted({round(i * (len(names) - 1) / (count - 1)) for i in range(count)})
    return [names[i] for i in idx]


def initial_weights_match(initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor],
                          frozen: Sequence[str]) -> Optional[bool]:
    """Whether the rebuilt initial weights equal the trained ones on layers training never changes.

    A check that an initial model rebuilt from the config and seed is the one training started from:
    frozen convs keep their initial weights. None when there is no frozen layer to compare.
    """
    keys = [k for k in frozen if k in initial and k in final]
    if not keys:
        return None
    return all(torch.equal(initial[k].detach().cpu(), final[k].detach().cpu()) for k in keys)



# -- the parts of a report that both adapters measure the same way --------------------------------
def check_same_plan(plan, cplan, checkpoint: str, compressed: str) -> None:
    """Raise unless both checkpoints carry a plan and it is the same (one run, dense and compressed)."""
    if plan is None or cplan is None:
        raise ValueError(f"{checkpoint if plan is None else compressed!r} carries no LRPET plan")
    if plan.ranks != cplan.ranks:
        raise ValueError(f"the plans of {checkpoint!r} and {compressed!r} differ: not the same run")


def factorized_layer_names(model: nn.Module, compressed: str) -> List[str]:
    """Names of the factorised convs of ``model`` (loaded from ``compressed``); an error if none."""
    from lrpet_dense.core import FactorizedConv2d

    names = sorted(n for n, m in model.named_modules() if isinstance(m, FactorizedConv2d))
    if not names:
        raise ValueError(f"{compressed!r} did not load as a factorised model (no FactorizedConv2d)")
    return names


def latency_section(latency_of: Callable[[nn.Module], Dict[str, Any]], dense: nn.Module, fact: nn.Module,
                    repeats: int, warmup: int) -> Dict[str, Any]:
    """The report's ``latency`` entry: ``latency_of(model)`` (``{part: measure_latency(...)}``) of both."""
    lat_d, lat_f = latency_of(dense), latency_of(fact)
    return {"threads": lat_d["model"]["threads"], "repeats": repeats, "warmup": warmup,
            "device": "CPU", "dense": lat_d, "factorized": lat_f}


def history_section(run_dir: str, notes: List[str]) -> List[Dict[str, Any]]:
    """The run's projection history, or ``[]`` with a note saying why there is none."""
    from .history import load_projection_history

    try:
        return load_projection_history(run_dir)
    except FileNotFoundError as e:
        notes.append(f"no projection history: {e}")
        return []


def spectra_section(plan, initial: nn.Module, final: nn.Module, source: str, count: int) -> Dict[str, Any]:
    """The report's ``spectra`` entry: singular values of ``count`` planned layers before and after."""
    names = spectra_layers(list(plan.layers), count)
    return {"initial_source": source, "layers": {
        n: {"rank": plan[n].rank, "initial": singular_values(initial.get_submodule(n).weight),
            "final": singular_values(final.get_submodule(n).weight)} for n in names}}
