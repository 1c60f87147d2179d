#!/usr/bin/env python
"""LRPET-S on the fidelity proxy, the paper's way: the searched per-stage plan against the single ratio, at equal
total training.

The protocol is the fidelity benchmark's (``bench_fidelity.py``: its budgets, proxy task, jobs, job cache and
statistics; the same ``--fidelity-out`` folder, so its finished jobs are reused):

1. **References.** The fidelity bench's own ``dense`` and ``lrpet`` rows at ``--cut`` (T iterations from the
   backbone pretrained on the source task, one ratio solved for the cut, the same BN ending), for ``--seeds``
   seeds, run through its job runner: reused from its job cache when the fidelity run made them.
2. **The search** (:mod:`lrpet_dense.search`, Optuna's GP sampler): ``--trials`` trials, each a short
   ``--trial-iters`` LRPET run (``projections_ft`` projections, ET + BNR, the hook's BN recalibration on
   ``bn_batches`` batches) with per-stage ratios, started from the dense(T) checkpoint of seed 0 (a cheap proxy
   score: the search does not pay a whole training per trial), factorised and scored by mmseg's ``IoUMetric`` on
   the proxy's test split. The hard budget is the single-ratio plan's backbone MACs (``max_size``; trials over
   it are pruned untrained) and ``lambda = 0``: among plans no larger than the single ratio's, the most accurate.
   Each stage's ratio lies within ``--span`` of the single ratio. ``--workers`` processes share one study in one
   SQLite file (Optuna's own storage; the path for several machines too).
3. **The best plan at equal total training**: trained exactly like the fidelity ``lrpet`` row (T iterations from
   the pretrained backbone, ``projections`` projections, the same seeds and schedule, the same ending: BN
   statistics recomputed on ``bn_batches`` training batches), only its plan differs (``Job.overrides``); compared
   with the ``lrpet`` rows at the same cut.

Reported (the fidelity bench's statistics): mean +- std over seeds, n, the value as trained beside the value after
the BN ending, Welch's t-test p (two-sided) against the single ratio, both plans' backbone MACs as the framework's
counter counts them, and the search's cost (wall and CPU time of its processes). Checks that can fail (exit
status 1): the searched plan's counted MACs at or below the single ratio's. The single-ratio plan the search
budgets against is checked to be the ``lrpet`` row's (it stops otherwise).

    python benchmarks/bench_search.py                       # 30 trials x 20 iterations, 3 seeds, full budget
    python benchmarks/bench_search.py --tiny --trials 2 --trial-iters 2 --seeds 1 --out /tmp/s --fidelity-out /tmp/f

Results: ``OUT/search_bench.{json,md}`` and the search's own report ``OUT/search.{json,md,png}`` (``--out``,
default ``<fidelity-out>/search``; ``--fidelity-out`` default ``output/fidelity/<full|quick|tiny>``, as
``bench_fidelity.py``'s ``--out``); ``--results`` copies them to ``benchmarks/results/search_bench.*``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from typing import Any, Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_fidelity as fid  # noqa: E402  (the fidelity protocol, its budget, jobs and job cache)
from _common import command_line, cpu_name  # noqa: E402

ROOT = fid.ROOT
MODES = {"tiny": fid.TINY, "quick": fid.QUICK, "full": fid.FULL}


def _search_cfg(setup: fid.Setup, work: str, trial_iters: int, cut: float):
    """A trial's config: the fidelity fine-tune config with the ``lrpet`` row's hook (ET + BNR, one ratio solved
    for ``cut``, which the trial replaces by its per-stage ratios), ``projections_ft`` projections, and the hook's
    BN recalibration on ``bn_batches`` batches as the ending (the bench's own ending is not run inside a trial)."""
    b = setup.budget
    cfg = fid._seg_cfg(setup, work, trial_iters, 0, finetune=True)
    options = fid.lrpet_hook_options(b, "lrpet", cut, trial_iters, b.projections_ft)
    options["precise_bn_iters"] = b.bn_batches
    cfg.custom_hooks = [dict(type="LRPETHook", **options)]
    return cfg


def _trial_runner(setup: fid.Setup, work: str, trial_iters: int, cut: float):
    """The search's trials: from the dense(T) checkpoint of seed 0."""
    from lrpet_dense.mmseg.search import SegTrialRunner

    dense = setup.ckpt(_dense_job(setup.budget, 0))
    if not os.path.isfile(dense):
        raise SystemExit(f"the dense(T) checkpoint of seed 0 is missing ({dense}) although its job is cached; delete "
                         f"{os.path.join(setup.out, 'jobs', _dense_job(setup.budget, 0).name)}_*.json to retrain it")
    return SegTrialRunner(_search_cfg(setup, work, trial_iters, cut), trial_iters, load_from=dense)


def _dense_job(b: fid.Budget, seed: int) -> fid.Job:
    return fid.Job("seg", "dense", None, seed, b.seg_iters, 0)


def _write_setup(setup: fid.Setup, path: str) -> None:
    with open(path, "w") as f:
        json.dump(asdict(setup), f)


def _read_setup(path: str) -> fid.Setup:
    with open(path) as f:
        raw = json.load(f)
    budget = fid.Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("budget").items()})
    return fid.Setup(budget=budget, **raw)


def search_worker(argv: Sequence[str]) -> int:
    """One search process (``--worker``): its share of the trials against the shared study."""
    p = argparse.ArgumentParser()
    p.add_argument("--setup", required=True)
    p.add_argument("--options", required=True)
    p.add_argument("--trial-iters", type=int, required=True)
    p.add_argument("--cut", type=float, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    setup = _read_setup(a.setup)
    fid._init_worker(setup)
    from lrpet_dense.search import SearchOptions, run_search

    with open(a.options) as f:
        options = SearchOptions(**json.load(f))
    runner = _trial_runner(setup, os.path.join(a.out, "cfg"), a.trial_iters, a.cut)
    run_search(runner, options, a.out)
    return 0


def _children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def _run_search(setup: fid.Setup, options: Dict[str, Any], args, out: str) -> Dict[str, float]:
    """``args.trials`` trials on ``args.workers`` processes sharing the study; their wall and CPU seconds."""
    setup_file = os.path.join(out, "setup.json")
    _write_setup(setup, setup_file)
    t0, c0 = time.time(), _children_cpu()
    per = [args.trials // args.workers + (1 if i < args.trials % args.workers else 0) for i in range(args.workers)]
    procs = []
    for i, n in enumerate(per):
        if not n:
            continue
        opt_file = os.path.join(out, f"options_{i}.json")
        with open(opt_file, "w") as f:  # each process: its share of the trials, its own sampler seed
            json.dump({**options, "trials": n, "seed": i}, f)
        log = open(os.path.join(out, f"worker_{i}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--setup", setup_file,
                                        "--options", opt_file, "--trial-iters", str(args.trial_iters),
                                        "--cut", repr(args.cut), "--out", out], stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, OMP_NUM_THREADS=str(setup.threads))), log))
    failed = []
    for proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode:
            failed.append(f"{log.name} (exit status {proc.returncode})")
    if failed:
        raise SystemExit(f"search process(es) failed; see {', '.join(failed)}")
    return {"wall_s": time.time() - t0, "cpu_s": _children_cpu() - c0}


def _row(name: str, label: str, runs: List[Dict[str, Any]], dense_macs: float) -> Dict[str, Any]:
    macs = sorted({r["macs"]["macs"] for r in runs})
    if len(macs) != 1:  # a plan depends on the shapes only: every seed's model has the same MACs
        raise SystemExit(f"{name}: the seeds' models have different backbone MACs {macs}")
    return {"row": name, "label": label, **fid._stats([r["value"] for r in runs]),
            "as_trained": fid._stats([r.get("value_as_trained", r["value"]) for r in runs]),
            "iters_total": runs[0]["start"] + runs[0]["iters"], "macs": macs[0], "macs_cut": 1 - macs[0] / dense_macs,
            "plan_cut": runs[0].get("plan_cut"), "seconds": sum(r.get("seconds", 0) for r in runs)}


def _run_jobs(setup: fid.Setup, jobs: List[fid.Job], workers: int) -> List[Dict[str, Any]]:
    """``jobs`` (and what they start from) through the fidelity bench's runner and cache; their results."""
    done = fid.run_all(setup, fid.add_jobs(setup.budget, [], *jobs), workers, None)
    missing = [j.name for j in jobs if j not in done]
    if missing:
        raise SystemExit(f"jobs not run: {', '.join(missing)}")
    return [done[j] for j in jobs]


def render_markdown(data: Dict[str, Any]) -> str:
    s, best, mode = data["search"], data["best"], data["mode"]
    lines = [f"# LRPET-S on the fidelity proxy, at equal total training ({mode} run)", "",
             f"- {data['date']}, {data['cpu']}, {data['threads']} thread(s) x {data['workers']} worker(s), torch "
             f"{data['torch']}; code {data['commit']}; command `{data['command']}`",
             f"- task: {data['task']}",
             f"- search: {s['trials']} trials ({s['trained']} trained x {s['trial_iters']} iterations from dense(T) of "
             f"seed 0, {s['over_budget']} over the budget and pruned untrained) on {data['workers']} process(es) "
             f"sharing one SQLite study, GP sampler ({s['startup_trials']} random start-up trials), stage ratios in "
             f"[{s['range'][0]:.3f}, {s['range'][1]:.3f}], lambda 0, budget: backbone MACs <= the single ratio's "
             f"({s['max_size']:.4f} of dense)",
             f"- search cost: {s['wall_s'] / 60:.1f} min wall, {s['cpu_s'] / 60:.1f} CPU-min (all its processes)",
             f"- best plan (trial {best['number']}, trial mIoU {best['mIoU']:.2f}, size {best['size']:.4f}): "
             f"`{ {k: round(v, 4) for k, v in data['overrides']} }`",
             f"- then trained like the fidelity `lrpet` row: {data['budget']['seg_iters']} iterations from the "
             f"pretrained backbone, {data['budget']['projections']} projections, BN statistics recomputed on "
             f"{data['budget']['bn_batches']} training batches at the end ('as trained': before it), "
             f"{len(data['seeds'])} seed(s); p: two-sided Welch t-test against the single ratio", "",
             "| row | total iters | mIoU | as trained | n | backbone MACs (counted) | MACs cut | vs single | p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        delta = "" if r.get("vs_single") is None else f"{r['vs_single']:+.2f}"
        lines.append(f"| {r['label']} | {r['iters_total']} | {fid._fmt(r)} | {r['as_trained']['mean']:.2f} | "
                     f"{r['n']} | {r['macs'] / 1e6:.1f} M | {r['macs_cut']:.1%} | {delta} | {fid._p(r.get('p'))} |")
    lines += ["", "## Checks", ""]
    for c in data["checks"]:
        lines.append(f"- {c['check']}: **{'ok' if c['ok'] else 'FAILED'}** ({c['detail']})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # one search process, started below
        return search_worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="on the fidelity benchmark's --quick budget")
    mode.add_argument("--tiny", action="store_true", help="on its --tiny budget (a smoke run)")
    p.add_argument("--fidelity-out", default=None, help="bench_fidelity.py's --out: its proxy, checkpoints and job "
                   "cache (default output/fidelity/<full|quick|tiny>)")
    p.add_argument("--out", default=None, help="this benchmark's folder (default <fidelity-out>/search)")
    p.add_argument("--cut", type=float, default=0.5, help="backbone MACs cut of the single ratio (the budget)")
    p.add_argument("--trials", type=int, default=30, help="trials (those over the budget are pruned untrained)")
    p.add_argument("--span", type=float, default=0.15, help="each stage's ratio range: single ratio +- span")
    p.add_argument("--trial-iters", type=int, default=20)
    p.add_argument("--startup-trials", type=int, default=6)
    p.add_argument("--seeds", type=int, default=None, help="seeds of the trained rows (default: the budget's)")
    p.add_argument("--workers", type=int, default=2, help="search processes sharing the study; job processes")
    p.add_argument("--resume", action="store_true", help="keep the trials of an earlier run's study (default: fresh)")
    p.add_argument("--results", action="store_true", help="copy search_bench.{json,md,png} to benchmarks/results/")
    args = p.parse_args(argv)
    if not 0 < args.cut < 1:
        p.error(f"--cut must lie in (0, 1), got {args.cut}")
    if args.trials < 1 or args.trial_iters < 1 or args.workers < 1 or (args.seeds is not None and args.seeds < 1):
        p.error("--trials, --trial-iters, --workers and --seeds must be >= 1")

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    budget = MODES[mode]
    budget = replace(budget, seeds=args.seeds or budget.seeds)  # seeds: not part of the jobs' cache key
    fout = os.path.abspath(args.fidelity_out or os.path.join(ROOT, "output", "fidelity", mode))
    out = os.path.abspath(args.out or os.path.join(fout, "search"))
    os.makedirs(out, exist_ok=True)
    setup, task = fid.make_setup(budget, fout, ("seg",))
    seeds = list(range(budget.seeds))
    T = budget.seg_iters
    t0 = time.time()

    # 1. the fidelity bench's dense and single-ratio rows (reused from its job cache when it made them)
    dense_runs = _run_jobs(setup, [_dense_job(budget, s) for s in seeds], args.workers)
    single_runs = _run_jobs(setup, [fid.Job("seg", "lrpet", args.cut, s, T, 0) for s in seeds], args.workers)

    # 2. the search, budgeted by the single-ratio plan as the lrpet row's hook builds it
    fid._init_worker(setup)
    runner = _trial_runner(setup, os.path.join(out, "cfg"), args.trial_iters, args.cut)
    single = runner.build_plan(runner.base)
    if single_runs[0].get("plan_cut") != single.reached_macs_cut:
        raise SystemExit(f"the single-ratio plan here (cut {single.reached_macs_cut!r}) is not the lrpet row's "
                         f"(cut {single_runs[0].get('plan_cut')!r}): the budget would be another plan's")
    from lrpet_dense.search import SearchOptions, plan_size_ratio, summarise_study, write_search_report

    max_size = plan_size_ratio(single, "macs")
    print(f"[search-bench] single ratio p={single.ratio:.4f}: backbone MACs cut {single.reached_macs_cut:.2%} "
          f"(budget: size <= {max_size:.4f})", flush=True)
    db = os.path.join(out, "study.db")
    if os.path.exists(db) and not args.resume:
        os.remove(db)  # a fresh study: the figures are this run's
    # each stage's ratio within +-span of the single ratio: about half the random plans meet the budget
    # (the others are pruned before training, at no cost but a plan computation)
    low, high = max(0.0, single.ratio - args.span), min(0.95, single.ratio + args.span)
    options = dict(trials=0, low=low, high=high, lam=0.0, measure="macs", max_size=max_size, sampler="gp",
                   startup_trials=args.startup_trials, seed=0, storage=f"sqlite:///{db}")
    cost = _run_search(setup, options, args, out)

    import optuna

    study = optuna.load_study(study_name="lrpet-search", storage=options["storage"])
    summary = summarise_study(study, "mIoU", SearchOptions(**options))
    write_search_report(summary, out)
    best = summary["best"]
    if best is None:
        raise SystemExit(f"no feasible trial finished; see the workers' logs in {out}")
    overrides = tuple(sorted((k, float(v)) for k, v in best["params"].items()))
    print(f"[search-bench] best trial {best['number']}: {dict(overrides)}, size {best['size']:.4f}, "
          f"trial mIoU {best['mIoU']:.2f}", flush=True)

    # 3. the best plan trained like the lrpet row: whole training, same seeds, same ending
    searched_runs = _run_jobs(setup, [fid.Job("seg", "lrpet", args.cut, s, T, 0, "search", overrides) for s in seeds],
                              args.workers)
    dense_macs = statistics.fmean(r["macs"]["macs"] for r in dense_runs)
    rows = [_row("dense", "dense", dense_runs, dense_macs),
            _row("single", f"LRPET, single ratio p={single.ratio:.3f} (the fidelity lrpet row)", single_runs,
                 dense_macs),
            _row("searched", "LRPET-S, searched per-stage ratios", searched_runs, dense_macs)]
    ref = rows[1]
    for r in (rows[0], rows[2]):
        r["vs_single"], r["p"] = r["mean"] - ref["mean"], fid.welch_p(r["values"], ref["values"])
    checks = [{"check": "the searched plan's counted backbone MACs at or below the single ratio's",
               "detail": f"{rows[2]['macs'] / 1e6:.1f} M vs {ref['macs'] / 1e6:.1f} M",
               "ok": bool(rows[2]["macs"] <= ref["macs"])}]
    import torch

    states = [t["state"] for t in summary["trials"]]
    data = {"mode": mode, "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "torch": torch.__version__,
            "commit": fid._commit(), "threads": setup.threads, "workers": args.workers,
            "command": command_line("bench_search.py", argv), "task": task,
            "budget": asdict(budget), "cut": args.cut, "seeds": seeds, "wall_minutes": (time.time() - t0) / 60,
            "search": {"trials": args.trials, "trial_iters": args.trial_iters, "startup_trials": args.startup_trials,
                       "range": [low, high], "max_size": max_size, "single_ratio": single.ratio,
                       "trained": states.count("COMPLETE"),
                       "over_budget": sum(1 for t in summary["trials"] if t["state"] == "PRUNED" and
                                          (t["size"] or 0) > max_size), **cost},
            "best": best, "overrides": [list(o) for o in overrides], "rows": rows, "checks": checks,
            "trials_table": summary["trials"],
            "results": {r["name"]: r for r in (*dense_runs, *single_runs, *searched_runs)}}
    text = render_markdown(data)
    with open(os.path.join(out, "search_bench.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, "search_bench.md"), "w") as f:
        f.write(text)
    print(text)
    if args.results:
        dest = os.path.join(ROOT, "benchmarks", "results")
        os.makedirs(dest, exist_ok=True)
        for ext in ("json", "md"):
            shutil.copy(os.path.join(out, f"search_bench.{ext}"), dest)
        if os.path.exists(os.path.join(out, "search.png")):
            shutil.copy(os.path.join(out, "search.png"), os.path.join(dest, "search_bench.png"))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
