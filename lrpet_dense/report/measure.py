"""Framework-free measurements for the report: CPU latency and weight spectra (torch only)."""
from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["measure_latency", "singular_values", "spectra_layers", "initial_weights_match", "RunMeasurer",
           "measure_run"]

logger = logging.getLogger(__name__)


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
    """Singular values (descending) of a conv weight viewed as ``n x (c*kh*kw)`` (docs/method.md, section 1)."""
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



# -- one skeleton for both frameworks ---------------------------------------------------------------
class RunMeasurer:
    """What a framework adapter tells :func:`measure_run` (the rest is the same for both frameworks).

    Subclasses implement each method with the framework's own loaders, counters and evaluators.
    """

    framework = ""
    #: How params and MACs are counted (shown in the report).
    counter = ""

    #: The adapter's ``load_model(cfg, path, dense_only=...) -> (model, checkpoint)``.
    load_model: Callable = None
    #: The adapter's ``plan_from_checkpoint(checkpoint) -> RankPlan or None``.
    plan_from_checkpoint: Callable = None

    def __init__(self, cfg):
        self.cfg = cfg

    def load(self, path: str, dense_only: bool) -> Tuple[nn.Module, dict]:
        """``(model in eval mode, checkpoint dict)``; a compressed checkpoint loads factorised."""
        return type(self).load_model(self.cfg, path, dense_only=dense_only)

    def plan_of(self, checkpoint: dict):
        """The rank plan a checkpoint carries, or None."""
        return type(self).plan_from_checkpoint(checkpoint)

    def title(self) -> str:
        raise NotImplementedError

    def input_hw(self, model: nn.Module) -> Tuple[int, int]:
        """The default input size for MACs and latency."""
        raise NotImplementedError

    def complexity(self, model: nn.Module, hw: Tuple[int, int]) -> Dict[str, Dict[str, int]]:
        """``{"backbone": {"params", "macs"}, "model": {...}}`` by the framework's counter."""
        raise NotImplementedError

    def forwards(self, model: nn.Module, hw: Tuple[int, int]) -> Dict[str, Callable[[], object]]:
        """``{"model": fn, "backbone": fn}``: one inference of each, to time."""
        raise NotImplementedError

    def evaluate(self, dense: nn.Module, fact: nn.Module) -> Dict[str, Any]:
        """The report's ``accuracy`` entry (metric, dataset, evaluator, dense, factorized, chance, chance_method)."""
        raise NotImplementedError

    def initial_model(self, initial: Optional[str], dense: nn.Module, notes: List[str]) -> Tuple[nn.Module, str, Optional[bool]]:
        """``(model before training, where it comes from, verified?)`` for the spectra."""
        raise NotImplementedError


def measure_run(m: RunMeasurer, checkpoint: str, compressed: str, *, run_dir: Optional[str] = None,
                initial: Optional[str] = None, input_hw: Optional[Tuple[int, int]] = None, evaluate: bool = True,
                latency_repeats: int = 10, latency_warmup: int = 2, threads: Optional[int] = None,
                num_spectra: int = 4, title: Optional[str] = None, config: Optional[str] = None) -> Dict[str, Any]:
    """Measure a projected dense checkpoint and its compressed checkpoint: the report's data.

    Both checkpoints must carry the same plan (one run); the compressed one must load factorised.

    Raises:
        ValueError: a checkpoint carries no LRPET plan, the two plans differ, or the compressed
            checkpoint did not load as a factorised model.
    """
    run_dir = run_dir or os.path.dirname(os.path.abspath(checkpoint))
    dense, ckpt = m.load(checkpoint, True)
    fact, cckpt = m.load(compressed, False)
    plan, cplan = m.plan_of(ckpt), m.plan_of(cckpt)
    if plan is None or cplan is None:
        raise ValueError(f"{checkpoint if plan is None else compressed!r} carries no LRPET plan")
    if plan.ranks != cplan.ranks:
        raise ValueError(f"the plans of {checkpoint!r} and {compressed!r} differ: not the same run")
    from lrpet_dense.core import FactorizedConv2d

    factorized = sorted(n for n, mod in fact.named_modules() if isinstance(mod, FactorizedConv2d))
    if not factorized:
        raise ValueError(f"{compressed!r} did not load as a factorised model (no FactorizedConv2d)")
    hw = tuple(int(s) for s in (input_hw or m.input_hw(dense)))
    data: Dict[str, Any] = {
        "framework": m.framework, "title": title or m.title(), "config": config,
        "checkpoint": checkpoint, "compressed_checkpoint": compressed, "run_dir": run_dir, "input_size": list(hw),
        "counter": m.counter, "plan": plan.to_dict(), "factorized_layers": factorized,
        "complexity": {"dense": m.complexity(dense, hw), "factorized": m.complexity(fact, hw)}, "notes": [],
    }
    logger.info("report: measuring CPU latency (%d runs each)", latency_repeats)

    def latency_of(model):
        return {part: measure_latency(fn, latency_repeats, latency_warmup, threads)
                for part, fn in m.forwards(model, hw).items()}

    lat_d, lat_f = latency_of(dense), latency_of(fact)
    data["latency"] = {"threads": lat_d["model"]["threads"], "repeats": latency_repeats, "warmup": latency_warmup,
                       "device": "CPU", "dense": lat_d, "factorized": lat_f}
    if evaluate:
        logger.info("report: evaluating the dense and the factorised model")
        data["accuracy"] = m.evaluate(dense, fact)
    from .history import load_projection_history

    try:
        data["history"] = load_projection_history(run_dir)
    except FileNotFoundError as e:
        data["notes"].append(f"no projection history: {e}")
        data["history"] = []
    init, source, verified = m.initial_model(initial, dense, data["notes"])
    names = spectra_layers(list(plan.layers), num_spectra)
    data["spectra"] = {"initial_source": source, "layers": {
        n: {"rank": plan[n].rank, "initial": singular_values(init.get_submodule(n).weight),
            "final": singular_values(dense.get_submodule(n).weight)} for n in names}}
    if verified is not None:
        data["spectra"]["initial_verified"] = verified
    return data
