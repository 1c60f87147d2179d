"""Framework-free measurements for the report: CPU latency and weight spectra (torch only)."""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from lrpet_dense.data.toy_voc import generated_dataset

from .timing import NOISE_RULE, judge_speedup, time_interleaved

__all__ = ["measure_latency_pair", "DEPLOY_FORM", "TOY_SMOKE_CHECK", "singular_values", "spectra_layers",
           "initial_weights_match", "RunMeasurer", "measure_run"]

logger = logging.getLogger(__name__)


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


#: What the report says next to an accuracy measured on the generated toy set.
TOY_SMOKE_CHECK = ("a smoke check, not a quality measure: measured on the generated toy set ({test} test images of "
                   "{size} px), it moves by several points with float32 rounding, which differs between CPUs; far "
                   "above chance, it shows that the pipeline learns")

#: How the report times both models (the report says so).
DEPLOY_FORM = ("the deploy form (`to_inference_`: BatchNorm folded into the convs, channels_last weights, the 1x1 "
               "convs left dense on the same oneDNN kernel as the factorised ones; checked in float64 against the "
               "model as loaded)")


def _load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def measure_latency_pair(dense: Mapping[str, Callable[[], object]], factorized: Mapping[str, Callable[[], object]],
                         macs_ratios: Mapping[str, float], *, rounds: int = 10, warmup: int = 3,
                         threads: Optional[int] = None) -> Dict[str, Any]:
    """Time each part dense vs factorised in interleaved rounds and judge each speed-up by the noise rule.

    Each part (e.g. ``"backbone"``, ``"model"``) is timed on its own: its dense and factorised callables
    in the same rounds (:func:`~lrpet_dense.report.timing.time_interleaved`), and the speed-up judged
    against that part's MACs ratio (:func:`~lrpet_dense.report.timing.judge_speedup`).

    Args:
        dense: ``{part: callable}`` of the dense model.
        factorized: ``{part: callable}`` of the factorised model (the same parts).
        macs_ratios: ``{part: MACs(dense) / MACs(factorised)}``.
        rounds: timed rounds (>= 1). Defaults to 10.
        warmup: untimed calls of each callable first (>= 0). Defaults to 3.
        threads: torch CPU threads while timing; None keeps torch's. Defaults to None.

    Returns:
        The report's ``latency`` entry: ``{"threads", "rounds", "warmup", "load_average": [before, after],
        "dense" | "factorized": {part: Timing.to_dict()}, "speedup": {part: SpeedUp.to_dict()}, "rule"}``.

    Raises:
        ValueError: the parts of ``dense``, ``factorized`` and ``macs_ratios`` differ, or a bad count.
    """
    if set(dense) != set(factorized) or set(dense) != set(macs_ratios):
        raise ValueError(f"dense, factorised and MACs ratios must name the same parts; got {sorted(dense)}, "
                         f"{sorted(factorized)} and {sorted(macs_ratios)}")
    used = threads or torch.get_num_threads()
    out: Dict[str, Any] = {"threads": used, "rounds": rounds, "warmup": warmup, "load_average": [_load_average()],
                           "dense": {}, "factorized": {}, "speedup": {}, "rule": NOISE_RULE}
    for part in dense:
        t = time_interleaved({"dense": dense[part], "factorized": factorized[part]}, rounds, warmup, threads=threads)
        s = judge_speedup(t["dense"], t["factorized"], macs_ratios[part])
        out["dense"][part], out["factorized"][part] = t["dense"].to_dict(), t["factorized"].to_dict()
        out["speedup"][part] = s.to_dict()
        if s.noisy:
            logger.warning("report: %s latency: %s", part, s.reason)
        else:
            logger.info("report: %s latency: dense %.1f ms, factorised %.1f ms, speed-up %s (MACs ratio %.2fx)", part,
                        t["dense"].median_ms, t["factorized"].median_ms, s.text(), s.macs_ratio)
    out["load_average"].append(_load_average())
    return out


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
    #: The adapter's ``to_inference_(model, check_hw=...) -> model``: the deploy form, checked, in place.
    to_inference: Callable = None
    #: The adapter's default ``check_hw`` of ``to_inference_``; the report checks at its input size when smaller.
    check_hw: Tuple[int, int] = (64, 64)

    def __init__(self, cfg):
        self.cfg = cfg

    def load(self, path: str, dense_only: bool) -> Tuple[nn.Module, dict]:
        """``(model in eval mode, checkpoint dict)``; a compressed checkpoint loads factorised."""
        return type(self).load_model(self.cfg, path, dense_only=dense_only)

    def plan_of(self, checkpoint: dict):
        """The rank plan a checkpoint carries, or None."""
        return type(self).plan_from_checkpoint(checkpoint)

    def deploy_copy(self, model: nn.Module, hw: Tuple[int, int]) -> nn.Module:
        """A copy of ``model`` in the deploy form (the latency is timed on it; ``model`` is left as it is),
        checked on an input of ``hw`` or of :attr:`check_hw` where that is smaller."""
        check = tuple(min(a, b) for a, b in zip(hw, self.check_hw))
        return type(self).to_inference(copy.deepcopy(model), check_hw=check)

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
                latency_repeats: int = 10, latency_warmup: int = 3, threads: Optional[int] = None,
                num_spectra: int = 4, title: Optional[str] = None, config: Optional[str] = None) -> Dict[str, Any]:
    """Measure a projected dense checkpoint and its compressed checkpoint: the report's data.

    Both checkpoints must carry the same plan (one run); the compressed one must load factorised.
    Params, MACs, accuracy and spectra are those of the models as loaded; the CPU latency is timed on
    copies of both in the deploy form (:data:`DEPLOY_FORM`), in interleaved rounds
    (:func:`measure_latency_pair`: ``latency_repeats`` rounds after ``latency_warmup`` warm-up calls).

    Raises:
        ValueError: ``latency_repeats`` < 1 or ``latency_warmup`` < 0, a checkpoint carries no LRPET
            plan, the two plans differ, or the compressed checkpoint did not load as a factorised model.
    """
    for name, value, low in (("latency_repeats", latency_repeats, 1), ("latency_warmup", latency_warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:  # before anything is loaded
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
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
    comp = data["complexity"]
    logger.info("report: timing the dense and the factorised model in the deploy form (%d warm-up calls, %d "
                "interleaved rounds)", latency_warmup, latency_repeats)
    dense_dep, fact_dep = m.deploy_copy(dense, hw), m.deploy_copy(fact, hw)
    fd, ff = m.forwards(dense_dep, hw), m.forwards(fact_dep, hw)
    macs_ratios = {part: comp["dense"][part]["macs"] / comp["factorized"][part]["macs"] for part in fd}
    data["latency"] = dict(measure_latency_pair(fd, ff, macs_ratios, rounds=latency_repeats, warmup=latency_warmup,
                                                threads=threads), device="CPU", form=DEPLOY_FORM)
    del dense_dep, fact_dep, fd, ff
    if evaluate:
        logger.info("report: evaluating the dense and the factorised model")
        data["accuracy"] = acc = m.evaluate(dense, fact)
        generated = generated_dataset(acc.pop("dataset_root", None))
        if generated and generated.get("kind") == "toy":
            acc["smoke_check"] = TOY_SMOKE_CHECK.format(**generated)
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
