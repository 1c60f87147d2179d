"""Factorise an LRPET-trained mmseg checkpoint into a compressed checkpoint carrying its plan.

Usage::

    python tools/compress_seg.py CONFIG CHECKPOINT OUT [--input-size H W] [--ratio P | --target-macs-cut C]

The plan is the one the ``LRPETHook`` saved in the checkpoint (``checkpoint['lrpet']['plan']``);
for a checkpoint without one (a dense model), give ``--ratio`` or ``--target-macs-cut``: the convs
are then projected once before factorising (a one-shot truncation; LRPET training does better).
The compressed checkpoint loads with ``mmseg.apis.init_model(CONFIG, OUT)`` when the config's model
type is ``LRPETEncoderDecoder``. Params and MACs before and after, from
``mmengine.analysis.get_model_complexity_info``, are printed for the backbone and the whole model.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch
from mmengine.config import Config, DictAction


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Factorise an LRPET-trained mmseg checkpoint.")
    p.add_argument("config", help="the training config (model type LRPETEncoderDecoder)")
    p.add_argument("checkpoint", help="the trained (projected) checkpoint")
    p.add_argument("out", help="where to write the compressed checkpoint")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size for MAC counting and the output check (default: the config's crop size)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, default=None, help="rank ratio p, for a checkpoint with no LRPET plan")
    g.add_argument("--target-macs-cut", type=float, default=None,
                   help="fraction of backbone MACs to cut, for a checkpoint with no LRPET plan")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings")
    return p.parse_args(argv)


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e8 else f"{n / 1e6:.3f} M"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mmseg.apis import init_model

    from lrpet_dense.core import RankPlan, project_layers_
    from lrpet_dense.io import check_finite_state, load_checkpoint_safe
    from lrpet_dense.mmseg import (PLAN_KEY, build_seg_plan, complexity, compress_model_, max_rank_excess, pair_conv_bn,
                                   save_compressed)
    from lrpet_dense.mmseg.hook import CHECKPOINT_KEY

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    ckpt = load_checkpoint_safe(args.checkpoint)
    if (ckpt.get("meta") or {}).get(PLAN_KEY) is not None:
        print(f"error: {args.checkpoint} is already compressed (factorised); give the dense training checkpoint "
              "it was made from (e.g. iter_N.pth)", file=sys.stderr)
        return 2
    try:
        check_finite_state(ckpt.get("state_dict", ckpt), f"checkpoint {args.checkpoint!r}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = init_model(cfg, args.checkpoint, device=args.device)
    hw = tuple(args.input_size) if args.input_size else tuple(getattr(model.data_preprocessor, "size", None) or (512, 512))

    state = ckpt.get(CHECKPOINT_KEY)
    if state is not None:
        if args.ratio is not None or args.target_macs_cut is not None:
            print("error: the checkpoint carries an LRPET plan; --ratio/--target-macs-cut apply only to "
                  "checkpoints without one", file=sys.stderr)
            return 2
        plan = RankPlan.from_dict(state["plan"])
        source = "the checkpoint's LRPET plan"
    else:
        if args.ratio is None and args.target_macs_cut is None:
            print("error: the checkpoint has no LRPET plan (not trained with LRPETHook); give --ratio or "
                  "--target-macs-cut", file=sys.stderr)
            return 2
        pairs, _, _ = pair_conv_bn(model)
        plan = build_seg_plan(model, pairs, ratio=args.ratio, target_macs_cut=args.target_macs_cut, input_size=hw)
        source = "a new plan (one-shot projection of a dense checkpoint)"
    excess = max_rank_excess(model, plan)
    if excess:
        # Not low-rank yet (a dense checkpoint, or one saved before the final projection): project
        # now so that factorising is exact.
        print(f"projecting {len(excess)} layer(s) whose weights exceed the planned rank")
        pairs, _, _ = pair_conv_bn(model, include=list(plan.layers), skip_frozen=False)
        hook_opts = [h for h in cfg.get("custom_hooks", []) if h.get("type") == "LRPETHook"]
        opts = hook_opts[0] if hook_opts else {}
        project_layers_(pairs, plan, energy_transfer=opts.get("energy_transfer", True),
                        bn_rectification=opts.get("bn_rectification", True), ridge=opts.get("ridge", 1e-5),
                        residual=opts.get("residual", 0.0))
    print(f"rank plan ({source}):\n{plan.format_table()}")

    x = torch.randn(1, 3, *hw, device=args.device)
    model.eval()
    with torch.no_grad():
        dense_out = model(x, mode="tensor")
    before = complexity(model, hw)
    names = compress_model_(model, plan)
    after = complexity(model, hw)
    with torch.no_grad():
        fact_out = model(x, mode="tensor")
    diff = (fact_out - dense_out).abs().max().item()
    scale = dense_out.abs().max().item()

    print(f"factorised {len(names)} of {len(plan)} planned convs (the rest would not save MACs)")
    print(f"complexity at {hw[0]}x{hw[1]} (mmengine.analysis.get_model_complexity_info):")
    print(f"{'':10s}{'params before':>16s}{'params after':>16s}{'MACs before':>16s}{'MACs after':>16s}{'MACs cut':>10s}")
    for key in ("backbone", "model"):
        b, a = before[key], after[key]
        cut = 1 - a["macs"] / b["macs"] if b["macs"] else 0.0
        print(f"{key:10s}{_fmt(b['params']):>16s}{_fmt(a['params']):>16s}{_fmt(b['macs']):>16s}"
              f"{_fmt(a['macs']):>16s}{cut:>10.1%}")
    print(f"max |factorised - dense| logit difference: {diff:.3e} (max |logit| {scale:.3e})")

    meta = {"dataset_meta": getattr(model, "dataset_meta", None), "source_checkpoint": args.checkpoint,
            "complexity_before": before, "complexity_after": after}
    save_compressed(model, args.out, meta=meta)
    print(f"saved the compressed checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
