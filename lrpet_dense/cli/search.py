"""``lrpet-dense search det|seg|mmdet``: LRPET-S, per-stage rank ratios by Bayesian optimisation (Optuna).

detectron2 (a config with ``LRPET.ENABLED``; ``MODEL.WEIGHTS`` are the starting weights)::

    lrpet-dense search det --config faster_rcnn_lrpet.yaml --trials 20 --trial-iters 500 --out search/ [KEY VALUE ...]

mmseg (a config with ``LRPETHook``; ``load_from`` / ``--load-from`` are the starting weights)::

    lrpet-dense search seg CONFIG --trials 20 --trial-iters 500 --out search/ [--cfg-options KEY=VALUE ...]

mmdet (the same options as mmseg)::

    lrpet-dense search mmdet CONFIG --trials 20 --trial-iters 500 --out search/ [--cfg-options KEY=VALUE ...]

Each trial trains ``--trial-iters`` iterations with LRPET and per-group ratios in ``[--low, --high]``
(groups: the stages of the selected layers, or ``--groups block``), factorises and evaluates; the
objective is ``error + --lambda x size`` (``--measure macs|params``), optionally under a hard budget
``--max-size``. The study is in ``--storage`` (default ``sqlite:///OUT/lrpet_search.db``; any URL
Optuna supports): rerun the command to resume an interrupted search, or run it on several
processes/machines against one database to share the work. ``OUT/search.md`` has the best plan as
snippets for both frameworks, the trials table and ``search.png`` (error vs size, Pareto front).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .common import DictAction

__all__ = ["add_parser", "main"]


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (reports, trial work dirs, default storage)")
    p.add_argument("--trials", type=int, default=20, help="trials to run now (the study keeps earlier ones)")
    p.add_argument("--trial-iters", type=int, default=500, help="training iterations per trial")
    p.add_argument("--low", type=float, default=0.2, help="lowest ratio of a group")
    p.add_argument("--high", type=float, default=0.8, help="highest ratio of a group")
    p.add_argument("--lambda", dest="lam", type=float, default=0.5, help="weight of the size in the objective")
    p.add_argument("--measure", choices=("macs", "params"), default="macs", help="the size in the objective")
    p.add_argument("--max-size", type=float, default=None, help="hard budget: at most this size ratio")
    p.add_argument("--sampler", choices=("gp", "tpe"), default="gp", help="gp: Gaussian process (the paper's); tpe")
    p.add_argument("--groups", choices=("stage", "block"), default="stage")
    p.add_argument("--startup-trials", type=int, default=5, help="random trials before the model-based sampler")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: a SQLite file in --out)")
    p.add_argument("--study-name", default="lrpet-search")
    p.add_argument("--seed", type=int, default=0)


def fill_parser(parser: argparse.ArgumentParser) -> None:
    fw = parser.add_subparsers(dest="framework", required=True, metavar="{det,seg,mmdet}")
    d = fw.add_parser("det", help="a detectron2 config with LRPET.ENABLED")
    d.add_argument("--config", "--config-file", dest="config_file", required=True, metavar="FILE")
    _options(d)
    d.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    d.set_defaults(run=lambda a: _guarded(_runner_det, a))
    s = fw.add_parser("seg", help="an mmseg config with LRPETHook")
    s.add_argument("config")
    _options(s)
    s.add_argument("--load-from", default=None, help="starting weights (default: the config's load_from)")
    s.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings (KEY=VALUE)")
    s.set_defaults(run=lambda a: _guarded(_runner_seg, a))
    m = fw.add_parser("mmdet", aliases=["det-mm"], help="an mmdet config with LRPETHook")
    m.add_argument("config")
    _options(m)
    m.add_argument("--load-from", default=None, help="starting weights (default: the config's load_from)")
    m.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings (KEY=VALUE)")
    m.set_defaults(run=lambda a: _guarded(_runner_mmdet, a))


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search per-stage rank ratios with Optuna (det | seg | mmdet)",
                       description=__doc__.split("\n\n")[0])
    fill_parser(p)


def _runner_det(args):
    from detectron2.utils.logger import setup_logger

    from lrpet_dense.detectron2.search import DetTrialRunner

    from .common import det_config

    setup_logger(name="lrpet_dense")
    return DetTrialRunner(det_config(args.config_file, args.opts), args.trial_iters)


def _runner_seg(args):
    from lrpet_dense.mmseg.search import SegTrialRunner

    from .common import seg_config

    return SegTrialRunner(seg_config(args.config, args.cfg_options), args.trial_iters, args.load_from)


def _runner_mmdet(args):
    from lrpet_dense.mmdet.search import MMDetTrialRunner

    from .common import seg_config

    return MMDetTrialRunner(seg_config(args.config, args.cfg_options), args.trial_iters, args.load_from)


def _guarded(make_runner, args) -> int:
    from lrpet_dense.search import SearchOptions, run_search, write_search_report

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = SearchOptions(trials=args.trials, low=args.low, high=args.high, lam=args.lam, measure=args.measure,
                                max_size=args.max_size, sampler=args.sampler, groups=args.groups, storage=args.storage,
                                study_name=args.study_name, seed=args.seed, startup_trials=args.startup_trials)
        summary = run_search(make_runner(args), options, args.out)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_search_report(summary, args.out)
    with open(paths["md"]) as f:
        print(f.read())
    print(f"search report: {paths['md']}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The subcommand on its own; returns the exit status."""
    parser = argparse.ArgumentParser(prog="lrpet-dense search", description=__doc__.split("\n\n")[0])
    fill_parser(parser)
    args = parser.parse_args(argv)
    return args.run(args)
