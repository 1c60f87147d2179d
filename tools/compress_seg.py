"""Factorise an LRPET-trained mmseg checkpoint into a compressed checkpoint carrying its plan.

Usage::

    python tools/compress_seg.py CONFIG CHECKPOINT OUT [--input-size H W]
        [--plan-from-config | --ratio P | --target-macs-cut C] [--project]

The plan is the one the ``LRPETHook`` saved in the checkpoint (``checkpoint['lrpet']['plan']``).
For a checkpoint without one (e.g. a dense model trained without LRPET), ``--plan-from-config``
computes it from the config's ``LRPETHook`` options, or ``--ratio P`` / ``--target-macs-cut C`` with
the hook's (default: the backbone's) layer selection. Every planned conv must already be of its
planned rank (the hook projects after the last iteration); a checkpoint that is not is refused,
unless ``--project`` asks to project it first (a one-shot truncation: LRPET training does better).
The factorised model's logits are checked against the dense model's in float64 before anything is
written. The compressed checkpoint loads into any model type through this project's tools and
``LRPETHook`` (mmseg's ``tools/test.py`` with the hook in the config), and with
``mmseg.apis.init_model(CONFIG, OUT)`` when the config's model type is ``LRPETEncoderDecoder``.
Params and MACs before and after, from ``mmengine.analysis.get_model_complexity_info``, are
printed for the backbone and the whole model.
"""
from __future__ import annotations

import argparse
import logging
import sys

from mmengine.config import Config, DictAction


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Factorise an LRPET-trained mmseg checkpoint.")
    p.add_argument("config", help="the training config")
    p.add_argument("checkpoint", help="the trained (projected) checkpoint")
    p.add_argument("out", help="where to write the compressed checkpoint")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size for MAC counting (default: the config's crop size)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan-from-config", action="store_true",
                   help="for a checkpoint without an LRPET plan: compute it from the config's LRPETHook options")
    g.add_argument("--ratio", type=float, default=None,
                   help="for a checkpoint without an LRPET plan: one rank ratio p")
    g.add_argument("--target-macs-cut", type=float, default=None,
                   help="for a checkpoint without an LRPET plan: the fraction of backbone MACs to cut")
    p.add_argument("--project", action="store_true",
                   help="project the planned convs onto their rank before factorising (one-shot truncation), "
                        "for weights that are not already low-rank")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings")
    return p.parse_args(argv)


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e8 else f"{n / 1e6:.3f} M"


def _hook_options(cfg) -> dict:
    hooks = [dict(h) for h in cfg.get("custom_hooks", []) if h.get("type") == "LRPETHook"]
    opts = hooks[0] if hooks else {}
    opts.pop("type", None)
    return opts


def _plan(args, cfg, model, ckpt, hw):
    from lrpet_dense.core import explicit_names
    from lrpet_dense.mmseg import DEFAULT_INCLUDE, build_seg_plan, pair_conv_bn, plan_from_checkpoint

    plan = plan_from_checkpoint(ckpt)
    asked = args.plan_from_config or args.ratio is not None or args.target_macs_cut is not None
    if plan is not None:
        if asked:
            raise ValueError(f"{args.checkpoint} carries an LRPET plan; --plan-from-config/--ratio/"
                             "--target-macs-cut apply only to checkpoints without one")
        return plan, "the checkpoint's LRPET plan"
    if not asked:
        raise ValueError(f"{args.checkpoint} carries no LRPET plan (not trained with LRPETHook); pass "
                         "--plan-from-config, --ratio P or --target-macs-cut C (with --project, since its weights are "
                         "not low-rank)")
    opts = _hook_options(cfg)
    if args.plan_from_config and not opts:
        raise ValueError(f"--plan-from-config: {args.config} has no LRPETHook in custom_hooks")
    ratio, cut = (opts.get("ratio"), opts.get("target_macs_cut")) if args.plan_from_config else (args.ratio,
                                                                                                args.target_macs_cut)
    include, exclude = list(opts.get("include", DEFAULT_INCLUDE)), list(opts.get("exclude", ()))
    overrides = dict(opts.get("overrides") or {})
    pairs, _, _ = pair_conv_bn(model, include, exclude, skip_frozen=not opts.get("include_frozen", False))
    plan = build_seg_plan(model, pairs, ratio=ratio, target_macs_cut=cut, overrides=overrides, input_size=hw,
                          project_unfactorized=explicit_names(include + list(overrides)))
    return plan, "a new plan from the config"


def main(argv=None) -> int:
    """Run the tool; returns the exit status (2, with a one-line ``error:`` on stderr, for bad input)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        return _compress(cfg, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _compress(cfg, args) -> int:
    import lrpet_dense.mmseg as lm

    model, ckpt = lm.load_model(cfg, args.checkpoint, device=args.device, dense_only=True)
    hw = tuple(args.input_size) if args.input_size else tuple(getattr(model.data_preprocessor, "size", None) or (512, 512))
    plan, source = _plan(args, cfg, model, ckpt, hw)
    print(f"rank plan ({source}):\n{plan.format_table()}")

    opts = _hook_options(cfg)
    options = {k: opts[k] for k in ("energy_transfer", "bn_rectification", "ridge", "residual") if k in opts}
    before = lm.complexity(model, hw)
    names = lm.compress_model_(model, plan, project=args.project, projection_options=options)
    after = lm.complexity(model, hw)

    print(f"factorised {len(names)} of {len(plan)} planned convs (the rest would not save MACs); logits checked "
          "against the dense model in float64")
    print(f"complexity at {hw[0]}x{hw[1]} (mmengine.analysis.get_model_complexity_info):")
    print(f"{'':10s}{'params before':>16s}{'params after':>16s}{'MACs before':>16s}{'MACs after':>16s}{'MACs cut':>10s}")
    for key in ("backbone", "model"):
        b, a = before[key], after[key]
        cut = 1 - a["macs"] / b["macs"] if b["macs"] else 0.0
        print(f"{key:10s}{_fmt(b['params']):>16s}{_fmt(a['params']):>16s}{_fmt(b['macs']):>16s}"
              f"{_fmt(a['macs']):>16s}{cut:>10.1%}")

    meta = {"dataset_meta": getattr(model, "dataset_meta", None), "source_checkpoint": args.checkpoint,
            "complexity_before": before, "complexity_after": after}
    lm.save_compressed(model, args.out, meta=meta)
    print(f"saved the compressed checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
