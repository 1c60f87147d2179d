"""Measure an LRPET-trained model and its compressed checkpoint; write report.md, report.json and PNGs.

One report for both frameworks (:mod:`lrpet_dense.report`); the measuring uses each framework's own
loaders, counters and evaluators::

    # detectron2 (after lrpet-dense train-det and lrpet-dense compress det)
    lrpet-dense report det --config configs/faster_rcnn_lrpet.yaml --checkpoint output/model_final.pth \\
        --compressed output/model_compressed.pth --out output/report [KEY VALUE ...]

    # mmseg (after mmseg's tools/train.py and lrpet-dense compress seg)
    lrpet-dense report seg configs/pspnet_r50-d8_lrpet_voc12aug-512x512.py work_dirs/x/iter_20000.pth \\
        work_dirs/x/compressed.pth --out work_dirs/x/report

    # mmdet (after mmdet's tools/train.py and lrpet-dense compress mmdet)
    lrpet-dense report mmdet CONFIG work_dirs/x/epoch_4.pth work_dirs/x/compressed.pth --out work_dirs/x/report

    # one summary of several reports
    lrpet-dense report summary output/report work_dirs/x/report --out summary.md

The report holds: params and MACs (dense vs factorised; backbone and whole model), the rank plan,
CPU latency of both models in the deploy form (``to_inference_``: BatchNorm folded, channels_last;
``--repeats`` interleaved rounds after ``--warmup`` calls, ``--threads`` threads; a speed-up above
the MACs ratio is reported as noise, not as a result), accuracy of the projected dense
and of the factorised model with a chance level from the same evaluator (``--no-eval`` skips it),
and figures: singular-value spectra before/after training (``--initial`` checkpoint, or the
model rebuilt from the config and its seed), rank per layer, energy kept and relative weight change
at each projection (from the run's ``metrics.json`` / ``scalars.json``; ``--run-dir``, default: the
checkpoint's folder). The Markdown report is printed at the end.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from .common import DictAction

__all__ = ["add_parser", "main"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder of report.md, report.json and the PNGs")
    p.add_argument("--run-dir", default=None, help="training output folder (default: the checkpoint's folder)")
    p.add_argument("--initial", default=None, help="checkpoint of the weights before training (for the spectra)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size for MACs and latency (default: the config's test size / crop size)")
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed rounds, each running the dense and the factorised model once (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each model before the rounds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the latency (default: torch's)")
    p.add_argument("--num-spectra", type=int, default=4, help="layers in the spectra figure")
    p.add_argument("--quiet", action="store_true", help="do not print the Markdown report")


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="measure a trained + compressed model and write its report (det | seg | mmdet | summary)",
                       description=__doc__.split("\n\n")[0])
    fill_parser(p)
    p.set_defaults(run=run)


def fill_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="framework", required=True)
    d = sub.add_parser("det", help="a detectron2 run")
    d.add_argument("--config", "--config-file", dest="config_file", required=True, metavar="FILE")
    d.add_argument("--checkpoint", required=True, help="trained dense checkpoint (e.g. model_final.pth)")
    d.add_argument("--compressed", required=True, help="its compressed checkpoint (tools/compress_det.py)")
    _common(d)
    d.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    s = sub.add_parser("seg", help="an mmseg run")
    s.add_argument("config")
    s.add_argument("checkpoint", help="trained (projected) checkpoint")
    s.add_argument("compressed", help="its compressed checkpoint (tools/compress_seg.py)")
    _common(s)
    s.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings (KEY=VALUE)")
    t = sub.add_parser("mmdet", aliases=["det-mm"], help="an mmdet run")
    t.add_argument("config")
    t.add_argument("checkpoint", help="trained (projected) checkpoint")
    t.add_argument("compressed", help="its compressed checkpoint (lrpet-dense compress mmdet)")
    _common(t)
    t.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings (KEY=VALUE)")
    t.set_defaults(measure=_measure_mmdet)
    m = sub.add_parser("summary", help="one Markdown summary of several report folders")
    m.add_argument("reports", nargs="+", help="folders holding report.json")
    m.add_argument("--out", required=True, help="summary Markdown file")


def _measure_det(args) -> dict:
    from detectron2.utils.logger import setup_logger

    from lrpet_dense.configs import resolve
    from lrpet_dense.detectron2.report import measure

    from .common import det_config

    setup_logger(name="detectron2")
    setup_logger(name="lrpet_dense")
    cfg = det_config(args.config_file, args.opts)
    return measure(cfg, args.checkpoint, args.compressed, config=resolve(args.config_file), **_options(args))


def _options(args) -> dict:
    return dict(run_dir=args.run_dir, initial=args.initial, input_hw=args.input_size, evaluate=not args.no_eval,
                latency_repeats=args.repeats, latency_warmup=args.warmup, threads=args.threads,
                num_spectra=args.num_spectra)


def _measure_seg(args) -> dict:
    from lrpet_dense.mmseg.report import measure

    from .common import seg_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = seg_config(args.config, args.cfg_options)
    return measure(cfg, args.checkpoint, args.compressed, **_options(args))


def _measure_mmdet(args) -> dict:
    from lrpet_dense.mmdet.report import measure

    from .common import seg_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = seg_config(args.config, args.cfg_options)
    return measure(cfg, args.checkpoint, args.compressed, **_options(args))


def run(args) -> int:
    from lrpet_dense.report import write_report, write_summary

    if args.framework == "summary":
        text = write_summary(args.reports, args.out)
        print(text)
        print(f"summary written to {args.out}")
        return 0
    try:  # bad input (a config, an option, a checkpoint): one error line, exit status 2, no report written
        if getattr(args, "measure", None) is not None:  # a subcommand that names its measurer
            data = args.measure(args)
        else:
            data = _measure_det(args) if args.framework == "det" else _measure_seg(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_report(data, args.out)
    if not args.quiet:
        with open(paths["markdown"]) as f:
            print(f.read())
    print(f"report written to {paths['markdown']} (+ report.json, "
          f"{', '.join(os.path.basename(p) for k, p in paths.items() if k not in ('markdown', 'json'))})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``tools/report.py``."""
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    fill_parser(parser)
    return run(parser.parse_args(argv))
