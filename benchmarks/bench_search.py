#!/usr/bin/env python
"""LRPET-S on the fidelity proxy: the searched per-stage plan against the single ratio, at equal MACs.

1. The dense PSPNet R50-D8 of the fidelity benchmark (``bench_fidelity.py``; trained here if its
   output folder has none) and the single-ratio plan at the ``--cut`` backbone MACs cut.
2. The search (:mod:`lrpet_dense.search`, Optuna's GP sampler): ``--trials`` trials, each a
   ``--trial-iters`` LRPET fine-tune from the dense weights with per-stage ratios, factorised and
   scored by mmseg's ``IoUMetric`` on the proxy's test split. Equal MACs is the hard budget
   (``max_size`` = the single-ratio plan's MACs) and ``lambda = 0``: among plans no larger than the
   single ratio's, the search looks for the most accurate. ``--workers`` processes share one study in
   one SQLite file (Optuna's own storage; the path for several machines too).
3. The best plan and the single ratio, each fine-tuned with the fidelity protocol (same iterations,
   projections, schedule, data order per seed) for ``--seeds`` seeds; the single-ratio runs are the
   fidelity benchmark's ``lrpet`` rows (reused from its job cache when it already ran them).

Reported: mean +- std mIoU of both, their counted backbone MACs, whether the difference exceeds the
noise (mean +- std intervals disjoint), and the search's cost (wall and CPU time of all its processes).

    python benchmarks/bench_search.py                       # 30 trials x 20 iterations, 3 seeds
    python benchmarks/bench_search.py --tiny --trials 2 --trial-iters 2 --seeds 1     # a smoke run

Results: ``OUT/search_bench.{json,md}`` (``--out``, default ``output/fidelity/<full|quick|tiny>/search``);
``--results`` copies them to ``benchmarks/results/``.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_fidelity as fid  # noqa: E402  (the fidelity protocol, its budget and job cache)
from _common import cpu_name  # noqa: E402

ROOT = fid.ROOT


def _search_cfg(setup, work: str, iters: int):
    """The fidelity fine-tune config with the LRPET hook the search varies (ET + BNR, its projections)."""
    cfg = fid._seg_cfg(setup, work, iters, setup.lr_seg * 0.5, 0)
    cfg.custom_hooks = [dict(type="LRPETHook", ratio=0.5, interval=max(iters // setup.budget.projections, 1),
                             energy_transfer=True, bn_rectification=True)]
    return cfg


def search_worker(argv) -> int:
    """One search process (``--worker``): trials against the shared study."""
    p = argparse.ArgumentParser()
    p.add_argument("--setup")
    p.add_argument("--options")
    p.add_argument("--trial-iters", type=int)
    p.add_argument("--out")
    a = p.parse_args(argv)
    with open(a.setup) as f:
        raw = json.load(f)
    budget = fid.Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("budget").items()})
    setup = fid.Setup(budget=budget, **raw)
    fid._init_worker(setup)
    from lrpet_dense.mmseg.search import SegTrialRunner
    from lrpet_dense.search import SearchOptions, run_search

    with open(a.options) as f:
        options = SearchOptions(**json.load(f))
    cfg = _search_cfg(setup, os.path.join(a.out, "cfg"), a.trial_iters)
    runner = SegTrialRunner(cfg, a.trial_iters, load_from=fid._dense_path(setup, "seg"))
    run_search(runner, options, a.out)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # one search process, started below
        return search_worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="on the fidelity benchmark's --quick setup")
    mode.add_argument("--tiny", action="store_true", help="on its --tiny setup (a smoke run)")
    p.add_argument("--fidelity-out", default=None, help="the fidelity benchmark's output folder (its dense model, "
                   "proxy and job cache; default output/fidelity/<full|quick>)")
    p.add_argument("--out", default=None)
    p.add_argument("--cut", type=float, default=0.5, help="backbone MACs cut of the single ratio (the budget)")
    p.add_argument("--trials", type=int, default=30, help="trials (those over the budget are pruned untrained)")
    p.add_argument("--span", type=float, default=0.15, help="each stage's ratio range: single ratio +- span")
    p.add_argument("--trial-iters", type=int, default=20)
    p.add_argument("--startup-trials", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="search processes sharing the study; fine-tune workers")
    p.add_argument("--resume", action="store_true", help="keep the trials of an earlier run's study (default: fresh)")
    p.add_argument("--results", action="store_true", help="copy search_bench.{json,md} to benchmarks/results/")
    args = p.parse_args(argv)

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    budget = replace({"tiny": fid.TINY, "quick": fid.QUICK, "full": fid.FULL}[mode], seeds=args.seeds)
    fout = args.fidelity_out or os.path.join(ROOT, "output", "fidelity", mode)
    out = args.out or os.path.join(fout, "search")
    os.makedirs(out, exist_ok=True)
    from lrpet_dense.data.proxy_voc import make_proxy_voc

    data_root = os.path.join(fout, "proxy")
    make_proxy_voc(data_root, budget.train_images, budget.test_images, budget.image_size)
    setup = fid.Setup(out=fout, data_root=data_root, budget=budget, extra={"reuse": True})
    fid._run_all(setup, [fid.Job("seg", "pretrain")], 1)  # reused from the fidelity run when it has one

    # the single-ratio plan: its MACs are the budget
    cfg = fid._seg_cfg(setup, os.path.join(out, "plan"), 1, setup.lr_seg, 0)
    import lrpet_dense.mmseg as lm

    dense, _ = lm.load_model(cfg, fid._dense_path(setup, "seg"))
    _, single = fid._seg_plan(dense, args.cut, "lrpet")
    max_size = 1.0 - single.reached_macs_cut
    print(f"[search-bench] single ratio p={single.ratio:.4f}: backbone MACs cut {single.reached_macs_cut:.2%} "
          f"(budget: size <= {max_size:.4f})", flush=True)

    # the search, on --workers processes sharing one study
    db = os.path.join(out, "study.db")
    if os.path.exists(db) and not args.resume:
        os.remove(db)  # a fresh study: the figures are this run's
    # each stage's ratio within +-span of the single ratio: about half the random plans meet the budget
    # (the others are pruned before training, at no cost but a plan computation)
    low, high = max(0.0, single.ratio - args.span), min(0.95, single.ratio + args.span)
    options = dict(trials=0, low=low, high=high, lam=0.0, measure="macs", max_size=max_size, sampler="gp",
                   startup_trials=args.startup_trials, seed=0, storage=f"sqlite:///{db}")
    from lrpet_dense.search import SearchOptions, summarise_study, write_search_report

    setup_file, t0 = os.path.join(out, "setup.json"), time.time()
    with open(setup_file, "w") as f:
        json.dump({**asdict(setup), "budget": asdict(budget)}, f)
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
                                        "--options", opt_file, "--trial-iters", str(args.trial_iters), "--out", out],
                                       stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, OMP_NUM_THREADS="1")), log))
    for proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode:
            raise SystemExit(f"a search process failed ({proc.returncode}); see {log.name}")
    search_wall = time.time() - t0
    search_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    search_cpu = search_cpu.ru_utime + search_cpu.ru_stime

    import optuna

    study = optuna.load_study(study_name="lrpet-search", storage=options["storage"])
    summary = summarise_study(study, "mIoU", SearchOptions(**{**options, "trials": 0}))
    write_search_report(summary, out)
    best = summary["best"]
    if best is None:
        raise SystemExit("no feasible trial finished; see the workers' logs")
    overrides = tuple(sorted(best["params"].items()))
    print(f"[search-bench] best trial {best['number']}: {dict(overrides)}, size {best['size']:.4f}, "
          f"trial mIoU {best['mIoU']:.2f}", flush=True)

    # both plans fine-tuned with the fidelity protocol, every seed
    jobs = [fid.Job("seg", "finetune", "lrpet", args.cut, s) for s in range(args.seeds)]
    jobs += [fid.Job("seg", "finetune", "lrpet-searched", args.cut, s, overrides) for s in range(args.seeds)]
    results = fid._run_all(setup, jobs, args.workers)
    rows = {}
    states = [t["state"] for t in summary["trials"]]
    trained, over = states.count("COMPLETE"), sum(1 for t in summary["trials"] if t["state"] == "PRUNED" and
                                                  (t["size"] or 0) > max_size)
    for name in ("lrpet", "lrpet-searched"):
        rs = [r for r in results if r["method"] == name]
        vals = [r["value"] for r in rs]
        rows[name] = {"values": vals, "mean": statistics.fmean(vals),
                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals),
                      "macs": rs[0]["macs"]["macs"], "plan_cut": rs[0].get("plan_cut")}
    a, b = rows["lrpet-searched"], rows["lrpet"]
    real = (abs(a["mean"] - b["mean"]) > a["std"] + b["std"]) if a["n"] > 1 and b["n"] > 1 else None
    import torch

    data = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "torch": torch.__version__,
            "command": " ".join(["python", "benchmarks/bench_search.py", *argv]),
            "mode": mode, "budget": asdict(budget), "cut": args.cut, "trials": args.trials,
            "trial_iters": args.trial_iters, "workers": args.workers, "search_wall_s": search_wall,
            "search_cpu_s": search_cpu, "trained_trials": trained, "over_budget_trials": over, "range": [low, high], "single_ratio": single.ratio, "best": best, "rows": rows,
            "real_difference": real, "trials_table": summary["trials"]}
    lines = [f"# LRPET-S on the fidelity proxy ({mode})", "",
             f"- {data['date']}, {data['cpu']}, torch {data['torch']}; command `{data['command']}`",
             f"- search: {args.trials} trials ({trained} trained x {args.trial_iters} iterations, {over} over the budget "
             f"and pruned untrained) on {args.workers} processes sharing one SQLite study (1 thread each), GP sampler "
             f"({args.startup_trials} random start-up trials), stage ratios in [{low:.3f}, {high:.3f}], lambda 0, "
             f"budget: backbone MACs <= the single ratio's ({max_size:.4f} of dense)",
             f"- search cost: {search_wall / 60:.1f} min wall, {search_cpu / 60:.1f} CPU-min",
             f"- best plan (trial {best['number']}, trial mIoU {best['mIoU']:.2f}, size {best['size']:.4f}): "
             f"`{dict((k, round(v, 4)) for k, v in overrides)}`",
             f"- then each plan fine-tuned with the fidelity protocol ({budget.seg_finetune} iterations, "
             f"{budget.projections} projections), {args.seeds} seeds", "",
             "| plan | mIoU | n | backbone MACs (counted) | MACs cut |", "|---|---:|---:|---:|---:|"]
    dense_macs = fid._seg_macs(dense, setup)["macs"]
    for name, label in (("lrpet", f"single ratio p={single.ratio:.3f}"), ("lrpet-searched", "searched (LRPET-S)")):
        r = rows[name]
        lines.append(f"| {label} | {r['mean']:.2f} +- {r['std']:.2f} | {r['n']} | {r['macs'] / 1e6:.1f} M | "
                     f"{1 - r['macs'] / dense_macs:.1%} |")
    verdict = {True: "exceeds the seed noise", False: "is within the seed noise",
               None: "cannot be set against the seed noise (one seed)"}[real]
    lines += ["", f"Searched - single: {a['mean'] - b['mean']:+.2f} mIoU, which {verdict} (mean +- std intervals)."]
    text = "\n".join(lines) + "\n"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
