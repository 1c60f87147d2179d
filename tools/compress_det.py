#!/usr/bin/env python
"""Factorise an LRPET-trained detectron2 checkpoint into a compressed checkpoint that carries its plan.

    python tools/compress_det.py --config configs/faster_rcnn_lrpet.yaml \
        --checkpoint output/model_final.pth --output output/model_compressed.pth [KEY VALUE ...]

The rank plan is read from the checkpoint (the LRPET hook stores it in every training checkpoint);
``--plan-from-config`` computes it from the config instead, for checkpoints without one. Every
planned conv must already be of its planned rank (LRPET projects after the last step), so the
factorised model computes what the projected dense model computes. Params and MACs of the backbone
and of the whole model, before and after, are counted with detectron2's ``FlopCountAnalysis`` (as in
detectron2's ``tools/analyze_model.py``) on one ``--input-size`` image (default: ``INPUT.MIN_SIZE_TEST``
square). Evaluate the result with::

    python tools/train_det.py --config configs/faster_rcnn_lrpet.yaml --eval-only MODEL.WEIGHTS output/model_compressed.pth
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from lrpet_dense.detectron2 import (PLAN_STATE_KEY, add_lrpet_config, build_lrpet_plan, compress_model_,  # noqa: E402
                                    count_flops_params, pairing_from_cfg, plan_from_checkpoint, save_compressed)
from lrpet_dense.io import check_finite_state, load_checkpoint_safe  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "--config-file", dest="config_file", required=True, metavar="FILE")
    p.add_argument("--checkpoint", required=True, help="trained dense checkpoint (e.g. model_final.pth)")
    p.add_argument("--output", required=True, help="where to write the compressed checkpoint")
    p.add_argument("--plan-from-config", action="store_true",
                   help="compute the plan from the config when the checkpoint carries none")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="image size for the MAC count (default: INPUT.MIN_SIZE_TEST square)")
    p.add_argument("--no-flops", action="store_true", help="skip the FlopCountAnalysis report")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return p


def load_dense_(model, path: str) -> dict:
    """Load a dense training checkpoint into ``model`` strictly; return the whole checkpoint dict."""
    ckpt = load_checkpoint_safe(path)
    state = ckpt.get("model", ckpt)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if ckpt.get("lrpet_factorized") is not None or PLAN_STATE_KEY in state:
        raise ValueError(f"checkpoint {path!r} is already compressed (factorised); give the dense training "
                         "checkpoint it was made from (e.g. model_final.pth)")
    check_finite_state(state, f"checkpoint {path!r}")
    try:
        res = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatches
        raise ValueError(f"checkpoint {path!r} does not match the config's model: {e}") from e
    missing, unexpected = list(res.missing_keys), list(res.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the config's model: {len(missing)} missing keys "
                         f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}")
    return ckpt


def _fmt(report) -> str:
    lines = [f"{'':10s} {'params (M)':>12s} {'MACs (G)':>10s}"]
    for part in ("backbone", "model"):
        lines.append(f"{part:10s} {report['params'][part] / 1e6:12.3f} {report['flops'][part] / 1e9:10.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    setup_logger(name="lrpet_dense")
    logger = setup_logger(name="detectron2")
    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()

    model = build_model(cfg)
    model.eval()
    ckpt = load_dense_(model, args.checkpoint)
    plan = plan_from_checkpoint(ckpt)
    if plan is None:
        if not args.plan_from_config:
            raise SystemExit(f"{args.checkpoint} carries no LRPET plan (not an LRPET training checkpoint); "
                             "pass --plan-from-config to compute it from the config")
        plan = build_lrpet_plan(cfg, model, pairing_from_cfg(cfg, model).layers)
    logger.info("LRPET plan:\n%s", plan.format_table())
    hw = tuple(args.input_size) if args.input_size else (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)

    before = None if args.no_flops else count_flops_params(model, hw)
    names = compress_model_(model, plan)
    after = None if args.no_flops else count_flops_params(model, hw)
    save_compressed(model, plan, args.output)

    print(f"factorised {len(names)} of {len(plan)} planned convs (ratio p={plan.ratio:g}); wrote {args.output}")
    if before is not None:
        print(f"FlopCountAnalysis at {hw[0]}x{hw[1]} (MACs of one inference):")
        print("before:\n" + _fmt(before))
        print("after:\n" + _fmt(after))
        for part in ("backbone", "model"):
            print(f"{part}: params -{1 - after['params'][part] / before['params'][part]:.1%}, "
                  f"MACs -{1 - after['flops'][part] / max(before['flops'][part], 1):.1%}")
    return {"before": before, "after": after, "factorized": names}


if __name__ == "__main__":
    main()
