#!/usr/bin/env python
"""Factorise an LRPET-trained detectron2 checkpoint into a compressed checkpoint that carries its plan.

    python tools/compress_det.py --config configs/faster_rcnn_lrpet.yaml \
        --checkpoint output/model_final.pth --output output/model_compressed.pth [KEY VALUE ...]

The rank plan is read from the checkpoint (the LRPET hook stores it in every training checkpoint).
For a checkpoint without one (e.g. a dense model trained without LRPET), ``--plan-from-config``
computes it from the config's ``LRPET`` keys, or ``--ratio P`` / ``--target-macs-cut C`` with the
config's layer selection. Every planned conv must already be of its planned rank (LRPET projects
after the last step); a checkpoint that is not is refused, unless ``--project`` asks to project it
first (a one-shot truncation: LRPET training does better). The factorised model's pre-NMS outputs
are checked against the dense model's in float64 before anything is written. Params and MACs of the
backbone and of the whole model, before and after, are counted with detectron2's
``FlopCountAnalysis`` (as in detectron2's ``tools/analyze_model.py``) on one ``--input-size`` image
(default: ``INPUT.MIN_SIZE_TEST`` square). Evaluate the result with::

    python tools/train_det.py --config configs/faster_rcnn_lrpet.yaml --eval-only MODEL.WEIGHTS output/model_compressed.pth
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from detectron2.config import get_cfg  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from lrpet_dense.detectron2 import (add_lrpet_config, build_lrpet_plan, compress_model_,  # noqa: E402
                                    count_flops_params, pairing_from_cfg, plan_from_checkpoint, save_compressed)
from lrpet_dense.detectron2.deploy import load_model  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "--config-file", dest="config_file", required=True, metavar="FILE")
    p.add_argument("--checkpoint", required=True, help="trained dense checkpoint (e.g. model_final.pth)")
    p.add_argument("--output", required=True, help="where to write the compressed checkpoint")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan-from-config", action="store_true",
                   help="for a checkpoint without an LRPET plan: compute it from the config's LRPET keys")
    g.add_argument("--ratio", type=float, default=None,
                   help="for a checkpoint without an LRPET plan: one rank ratio p for the config's selection")
    g.add_argument("--target-macs-cut", type=float, default=None,
                   help="for a checkpoint without an LRPET plan: the fraction of backbone MACs to cut")
    p.add_argument("--project", action="store_true",
                   help="project the planned convs onto their rank before factorising (one-shot truncation), "
                        "for weights that are not already low-rank")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="image size for the MAC count (default: INPUT.MIN_SIZE_TEST square)")
    p.add_argument("--no-flops", action="store_true", help="skip the FlopCountAnalysis report")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return p


def _fmt(report) -> str:
    lines = [f"{'':10s} {'params (M)':>12s} {'MACs (G)':>10s}"]
    for part in ("backbone", "model"):
        lines.append(f"{part:10s} {report['params'][part] / 1e6:12.3f} {report['flops'][part] / 1e9:10.3f}")
    return "\n".join(lines)


def _plan(cfg, args, model, ckpt):
    plan = plan_from_checkpoint(ckpt)
    asked = args.plan_from_config or args.ratio is not None or args.target_macs_cut is not None
    if plan is not None:
        if asked:
            raise ValueError(f"{args.checkpoint} carries an LRPET plan; --plan-from-config/--ratio/"
                             "--target-macs-cut apply only to checkpoints without one")
        return plan, "the checkpoint's LRPET plan"
    if not asked:
        raise ValueError(f"{args.checkpoint} carries no LRPET plan (not an LRPET training checkpoint); pass "
                         "--plan-from-config, --ratio P or --target-macs-cut C (with --project, since its weights "
                         "are not low-rank)")
    if args.ratio is not None or args.target_macs_cut is not None:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.LRPET.TARGET_MACS_CUT = float(args.target_macs_cut or 0.0)
        if args.ratio is not None:
            cfg.LRPET.RATIO = float(args.ratio)
        cfg.freeze()
    return build_lrpet_plan(cfg, model, pairing_from_cfg(cfg, model).layers), "a new plan from the config"


def main(argv=None) -> int:
    """Run the tool; returns the exit status (2, with a one-line ``error:`` on stderr, for bad input)."""
    args = get_parser().parse_args(argv)
    setup_logger(name="lrpet_dense")
    logger = setup_logger(name="detectron2")
    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    try:
        return _compress(cfg, args, logger)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _compress(cfg, args, logger) -> int:
    model, ckpt = load_model(cfg, args.checkpoint, dense_only=True)
    plan, source = _plan(cfg, args, model, ckpt)
    logger.info("LRPET plan (%s):\n%s", source, plan.format_table())
    hw = tuple(args.input_size) if args.input_size else (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)

    before = None if args.no_flops else count_flops_params(model, hw)
    options = dict(energy_transfer=bool(cfg.LRPET.ENERGY_TRANSFER), bn_rectification=bool(cfg.LRPET.BN_RECTIFICATION),
                   ridge=float(cfg.LRPET.RIDGE), residual=float(cfg.LRPET.RESIDUAL))
    names = compress_model_(model, plan, project=args.project, projection_options=options)
    after = None if args.no_flops else count_flops_params(model, hw)
    save_compressed(model, plan, args.output)

    print(f"factorised {len(names)} of {len(plan)} planned convs (ratio p={plan.ratio:g}); outputs checked against "
          f"the dense model in float64; wrote {args.output}")
    if before is not None:
        print(f"FlopCountAnalysis at {hw[0]}x{hw[1]} (MACs of one inference):")
        print("before:\n" + _fmt(before))
        print("after:\n" + _fmt(after))
        for part in ("backbone", "model"):
            print(f"{part}: params -{1 - after['params'][part] / before['params'][part]:.1%}, "
                  f"MACs -{1 - after['flops'][part] / max(before['flops'][part], 1):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
