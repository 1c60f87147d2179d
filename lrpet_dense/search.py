"""LRPET-S: per-stage rank ratios found by Bayesian optimisation (paper, section III-E2), with Optuna.

The paper's searched variant sets a ratio per layer group by Bayesian optimisation of
``error + lambda * (compressed size / original size)`` (a Gaussian-process model with expected
improvement, 20 iterations, each a short training). Here:

- the groups are the stages of the selected layers (``backbone.res3``, ``backbone.layer2``,
  ``roi_heads.res5``, ...; ``groups="block"``: one group per residual block), each with a ratio in
  ``[low, high]``; a group's ratio becomes an override (``{"backbone.res3.*": 0.6}``), which both
  frameworks read (``cfg.LRPET.OVERRIDES`` / ``LRPETHook(overrides=...)``);
- each trial is a short LRPET training through the framework's own trainer from the user's config
  (and its starting weights), scored with the framework's own evaluator (a :class:`TrialRunner` of
  :mod:`lrpet_dense.detectron2.search` / :mod:`lrpet_dense.mmseg.search`); the size is the
  selection's analytic MACs (or params) after factorisation relative to before, known from the plan
  without training;
- a MACs budget can be a hard constraint (trials over it are infeasible for the sampler and are not
  trained);
- Optuna is the engine: its ``GPSampler`` (Gaussian process, log expected improvement) by default, TPE
  as an option; a trial whose training diverges (NaN/Inf) is pruned, not fatal. The study lives in
  Optuna's database storage (``sqlite:///...`` by default, any URL Optuna supports), so an
  interrupted search resumes with its finished trials and several processes or machines can work on
  one study (each runs the same command).

Output: the best plan's overrides as snippets for both frameworks, the trials table, and an
error-vs-size plot with the Pareto front (:func:`write_search_report`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["TrialRunner", "SearchOptions", "layer_groups", "run_search", "pareto_front", "write_search_report"]

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^\d+$")


def layer_groups(names: Sequence[str], level: str = "stage") -> Dict[str, List[str]]:
    """``{group pattern: [layer names]}``: layers grouped by stage (``level="stage"``) or residual block.

    A stage is the name up to the first numeric component (``backbone.layer2.3.conv1`` ->
    ``backbone.layer2``); a block includes it (``backbone.layer2.3``). Names without a numeric
    component (e.g. ``backbone.fpn_lateral2``) form one group with their parent (``backbone``).
    """
    if level not in ("stage", "block"):
        raise ValueError(f"groups must be 'stage' or 'block', got {level!r}")
    groups: Dict[str, List[str]] = {}
    for name in names:
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if _BLOCK.match(p)), None)
        if idx is None:
            key = ".".join(parts[:-1]) or parts[0]
        else:
            key = ".".join(parts[: idx + (1 if level == "block" else 0)])
        groups.setdefault(key, []).append(name)
    return {f"{k}.*": v for k, v in groups.items()}


class TrialRunner:
    """What a framework adapter provides to :func:`run_search`; the trial's steps are written once here.

    A trial is :meth:`train` (the framework's own trainer, supplied by the adapter's runner: a short
    LRPET training with the trial's per-group ratios, returning the trained model and its plan), then,
    here, a check that training did not diverge (:func:`check_finite`), the checked factorisation
    (:meth:`~lrpet_dense.core.adapter.Adapter.compress_model_`), and :meth:`evaluate` (the framework's
    evaluator, supplied). Plans for :meth:`size_ratio` come from the adapter's
    :meth:`~lrpet_dense.core.adapter.Adapter.build_plan`. :func:`run_search` only needs ``names``,
    ``metric``, :meth:`size_ratio` and :meth:`train_and_score`.

    Args:
        iters: training iterations per trial (> 0).
        base: the config's LRPET options (an :class:`~lrpet_dense.core.LRPETConfig`).
        model: the model built from the config (to select layers and plan; not trained).
        adapter: the framework's :class:`~lrpet_dense.core.adapter.Adapter`.
        input_hw: the planning input size when the options do not set one. Defaults to the adapter's.

    Attributes:
        names: the selected layers (as the config's LRPET options select them).
        metric: the evaluator's metric (higher is better, 0-100), e.g. ``"mIoU"`` or ``"AP50"``.
    """

    names: List[str] = []
    metric: str = ""

    def __init__(self, iters: int, base, model, adapter, input_hw: Optional[Tuple[int, int]] = None) -> None:
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"trial iterations must be a positive integer, got {iters!r}")
        self.iters, self.base, self.model, self.adapter, self.input_hw = iters, base, model, adapter, input_hw
        self.layers = adapter.pair_convs(model, base).layers
        self.names = [l.name for l in self.layers]

    def trial_config(self, overrides: Mapping[str, float]):
        """The config's LRPET options with the trial's per-group ratios (and nothing else choosing ranks)."""
        return self.base.replace(ratio=None, target_macs_cut=None, target_latency_cut=None, rank_policy="uniform",
                                 overrides=dict(overrides))

    def build_plan(self, config):
        """The framework's rank plan of ``self.layers`` under ``config``."""
        return self.adapter.build_plan(self.model, self.layers, config, self.input_hw)

    def size_ratio(self, overrides: Mapping[str, float], measure: str) -> float:
        """The selection's MACs (or params) after factorisation / before, for these ratios (no training)."""
        return plan_size_ratio(self.build_plan(self.trial_config(overrides)), measure)

    def train(self, overrides: Mapping[str, float], work_dir: str, seed: int):
        """Supplied: a short LRPET training with these ratios; ``(trained model, its plan)``."""
        raise NotImplementedError

    def evaluate(self, model) -> float:
        """Supplied: the factorised model's score (the metric, 0-100) by the framework's evaluator."""
        raise NotImplementedError

    def train_and_score(self, overrides: Mapping[str, float], work_dir: str, seed: int) -> float:
        """A short LRPET training with these ratios, factorised (checked) and evaluated: the metric (0-100)."""
        model, plan = self.train(overrides, work_dir, seed)
        model = self.adapter.unwrap(model)
        check_finite(model)  # a diverged trial is pruned by the search, not fatal
        self.adapter.compress_model_(model, plan)
        return float(self.evaluate(model.eval()))


@dataclass(frozen=True)
class SearchOptions:
    """How to search (validated on construction).

    Args:
        trials: trials to run in this process (the study may hold more from earlier runs). Default 20.
        low, high: each group's ratio range. Defaults to 0.2 and 0.8.
        lam: ``lambda >= 0`` of ``error + lambda * size``. Defaults to 0.5.
        measure: ``"macs"`` or ``"params"``: the size in the objective. Defaults to ``"macs"``.
        max_size: a hard budget on that size ratio (e.g. 0.5 = at most half the MACs), or None.
        sampler: ``"gp"`` (Gaussian process, the paper's) or ``"tpe"``. Defaults to ``"gp"``.
        groups: ``"stage"`` or ``"block"``. Defaults to ``"stage"``.
        storage: an Optuna storage URL; defaults to a SQLite file in the output folder.
        study_name: defaults to ``"lrpet-search"``.
        seed: the sampler's seed and the trials' training seed. Defaults to 0.
        startup_trials: random trials before the model-based sampler takes over. Defaults to 5.
    """

    trials: int = 20
    low: float = 0.2
    high: float = 0.8
    lam: float = 0.5
    measure: str = "macs"
    max_size: Optional[float] = None
    sampler: str = "gp"
    groups: str = "stage"
    storage: Optional[str] = None
    study_name: str = "lrpet-search"
    seed: int = 0
    startup_trials: int = 5

    def __post_init__(self):
        if not (isinstance(self.trials, int) and self.trials >= 0):
            raise ValueError(f"trials must be an integer >= 0, got {self.trials!r}")
        if not (0 <= self.low < self.high < 1):
            raise ValueError(f"the ratio range must satisfy 0 <= low < high < 1, got [{self.low}, {self.high}]")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lambda must be a finite number >= 0, got {self.lam!r}")
        if self.measure not in ("macs", "params"):
            raise ValueError(f"measure must be 'macs' or 'params', got {self.measure!r}")
        if self.max_size is not None and not 0 < self.max_size <= 1:
            raise ValueError(f"max_size must lie in (0, 1] (a fraction of the dense size), got {self.max_size!r}")
        if self.sampler not in ("gp", "tpe"):
            raise ValueError(f"sampler must be 'gp' or 'tpe', got {self.sampler!r}")
        if self.groups not in ("stage", "block"):
            raise ValueError(f"groups must be 'stage' or 'block', got {self.groups!r}")


def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise ImportError("the rank search needs Optuna: pip install 'lrpet-dense[search]'") from e
    return optuna


def _open_study(options: SearchOptions, out: str, groups: Sequence[str]):
    optuna = _optuna()
    storage = options.storage or f"sqlite:///{os.path.abspath(os.path.join(out, 'lrpet_search.db'))}"

    def constraints(trial) -> List[float]:  # <= 0 is feasible
        return [trial.user_attrs.get("size", 0.0) - options.max_size] if options.max_size is not None else []

    common = dict(seed=options.seed, constraints_func=constraints if options.max_size is not None else None)
    if options.sampler == "gp":
        sampler = optuna.samplers.GPSampler(n_startup_trials=options.startup_trials, **common)
    else:
        sampler = optuna.samplers.TPESampler(n_startup_trials=options.startup_trials, **common)
    try:
        backend: Any = storage
        if "://" in storage and not storage.startswith("journal"):  # a database: heartbeats fail stale trials
            backend = optuna.storages.RDBStorage(storage, heartbeat_interval=30, grace_period=120)
        study = optuna.create_study(storage=backend, sampler=sampler, study_name=options.study_name,
                                    direction="minimize", load_if_exists=True)
    except Exception as e:  # a URL that cannot be opened, an unknown dialect, ...
        raise ValueError(f"cannot open the Optuna storage {storage!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    saved = study.user_attrs.get("groups")
    if saved is not None and list(saved) != list(groups):
        raise ValueError(f"study {options.study_name!r} in {storage} searched other groups {saved}; use another "
                         "--study-name or the config it was started with")
    study.set_user_attr("groups", list(groups))
    return study, storage


def run_search(runner: TrialRunner, options: SearchOptions, out: str) -> Dict[str, Any]:
    """Search per-group ratios; returns the study's summary (best trial, all trials, Pareto front).

    Raises:
        ValueError: an empty search space, a budget no plan in the range can meet, a storage that
            cannot be opened (and ``SearchOptions``' own checks).
    """
    optuna = _optuna()
    os.makedirs(out, exist_ok=True)
    groups = layer_groups(runner.names, options.groups)
    if not groups:
        raise ValueError("the search space is empty: the config's LRPET options select no layer")
    if options.max_size is not None:
        smallest = runner.size_ratio({g: options.high for g in groups}, options.measure)
        if smallest > options.max_size:
            raise ValueError(f"no plan can meet the budget: even ratio {options.high} everywhere leaves "
                             f"{smallest:.3f} of the {options.measure} (budget {options.max_size}); raise the budget or "
                             "the ratio range")
    study, storage = _open_study(options, out, list(groups))
    logger.info("rank search: %d groups %s, study %r in %s (%d trials there already)", len(groups), list(groups),
                options.study_name, storage, len(study.trials))

    def objective(trial) -> float:
        overrides = {g: trial.suggest_float(g, options.low, options.high) for g in groups}
        size = runner.size_ratio(overrides, options.measure)
        trial.set_user_attr("size", size)
        if options.max_size is not None and size > options.max_size:
            raise optuna.TrialPruned(f"size {size:.3f} over the budget {options.max_size}")  # not trained
        try:
            score = runner.train_and_score(overrides, os.path.join(out, f"trial_{trial.number}"), options.seed)
        except FloatingPointError as e:  # detectron2's guard against NaN losses
            raise optuna.TrialPruned(f"training diverged: {e}") from e
        if score is None or not math.isfinite(score):
            raise optuna.TrialPruned(f"training diverged ({runner.metric} = {score})")
        trial.set_user_attr(runner.metric, score)
        return (100.0 - score) / 100.0 + options.lam * size

    if options.trials:
        study.optimize(objective, n_trials=options.trials, catch=())
    return summarise_study(study, runner.metric, options)


def check_finite(model) -> None:
    """Raise ``FloatingPointError`` when a trial's training left non-finite weights (it diverged)."""
    import torch

    bad = [n for n, t in model.state_dict().items() if torch.is_tensor(t) and t.is_floating_point() and
           not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(f"non-finite weights after training ({len(bad)} tensors, e.g. {bad[0]})")


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points (size, error) that no other point beats in both (ties kept), by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def summarise_study(study, metric: str, options: SearchOptions) -> Dict[str, Any]:
    optuna = _optuna()
    rows = []
    for t in study.trials:
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params), "objective": t.value,
                     "size": t.user_attrs.get("size"), metric: t.user_attrs.get(metric),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None})
    done = [r for r in rows if r["state"] == optuna.trial.TrialState.COMPLETE.name]
    feasible = [r for r in done if options.max_size is None or r["size"] <= options.max_size]
    best = min(feasible, key=lambda r: r["objective"]) if feasible else None
    front = pareto_front([(r["size"], 100.0 - r[metric]) for r in done])
    return {"metric": metric, "options": {k: getattr(options, k) for k in options.__dataclass_fields__},
            "trials": rows, "best": best, "pareto": [done[i]["number"] for i in front]}


def snippets(overrides: Mapping[str, float]) -> Dict[str, str]:
    """The overrides as detectron2 and the OpenMMLab hook (mmseg, mmdet) read them."""
    flat = ", ".join(f'"{k}", {v:.4f}' for k, v in overrides.items())
    d2 = f"LRPET:\n  OVERRIDES: [{flat}]"
    seg = "overrides={" + ", ".join(f"{k!r}: {v:.4f}" for k, v in overrides.items()) + "}"
    return {"detectron2": d2, "mmseg": f"custom_hooks = [dict(type='LRPETHook', ..., {seg})]"}


def write_search_report(summary: Dict[str, Any], out: str) -> Dict[str, str]:
    """``search.json``, ``search.md`` (best plan's snippets, trials table) and ``search.png`` (error vs size,
    Pareto front) in ``out``; returns their paths."""
    metric = summary["metric"]
    paths = {k: os.path.join(out, f"search.{k}") for k in ("json", "md", "png")}
    best = summary["best"]
    if best is not None:
        summary = dict(summary, snippets=snippets(best["params"]))
    with open(paths["json"], "w") as f:
        json.dump(summary, f, indent=1, default=str)
    lines = ["# LRPET-S rank search", "", f"- options: `{json.dumps(summary['options'])}`",
             f"- objective: error + lambda x {summary['options']['measure']} ratio (error = 1 - {metric}/100)", ""]
    if best is None:
        lines += ["No completed feasible trial yet.", ""]
    else:
        lines += [f"Best trial {best['number']}: {metric} {best[metric]:.2f}, {summary['options']['measure']} ratio "
                  f"{best['size']:.3f}, objective {best['objective']:.4f}", "", "detectron2:", "", "```yaml",
                  summary["snippets"]["detectron2"], "```", "", "mmseg, mmdet:", "", "```python", summary["snippets"]["mmseg"],
                  "```", ""]
    lines += ["| trial | state | " + metric + " | size | objective | Pareto | ratios |", "|---:|---|---:|---:|---:|---|---|"]
    for r in summary["trials"]:
        val = "-" if r.get(metric) is None else f"{r[metric]:.2f}"
        size = "-" if r.get("size") is None else f"{r['size']:.3f}"
        obj = "-" if r.get("objective") is None else f"{r['objective']:.4f}"
        ratios = ", ".join(f"{k.rstrip('.*')} {v:.2f}" for k, v in r["params"].items())
        lines.append(f"| {r['number']} | {r['state']} | {val} | {size} | {obj} | "
                     f"{'yes' if r['number'] in summary['pareto'] else ''} | {ratios} |")
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        done = [r for r in summary["trials"] if r.get(metric) is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([r["size"] for r in done], [100 - r[metric] for r in done], label="trials")
        front = sorted((r for r in done if r["number"] in summary["pareto"]), key=lambda r: r["size"])
        ax.plot([r["size"] for r in front], [100 - r[metric] for r in front], "r-o", label="Pareto front")
        ax.set_xlabel(f"{summary['options']['measure']} after / before (selected convs)")
        ax.set_ylabel(f"error = 100 - {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths["png"], dpi=110)
        plt.close(fig)
    except ImportError:
        del paths["png"]
    return paths


def plan_size_ratio(plan, measure: str) -> float:
    """A plan's size after factorisation / before: the reference (backbone conv) MACs, or the planned
    convs' weights (params), counting factorised layers as ``k (d + n)`` where that is smaller."""
    if measure == "macs":
        return 1.0 - plan.reached_macs_cut
    before = after = 0
    for lp in plan.layers.values():
        n, c, kh, kw = lp.shape
        before += n * c * kh * kw
        after += lp.rank * (c * kh * kw + n) if lp.factorize else n * c * kh * kw
    return after / before if before else 1.0
