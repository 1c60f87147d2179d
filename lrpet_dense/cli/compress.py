"""``lrpet-dense compress det|seg|mmdet``: factorise an LRPET-trained checkpoint into a compressed checkpoint.

detectron2 (its conventions: ``--config`` and ``KEY VALUE`` overrides)::

    lrpet-dense compress det --config configs/faster_rcnn_lrpet.yaml --checkpoint output/model_final.pth \\
        --output output/model_compressed.pth [KEY VALUE ...]

mmseg (its conventions: positional config and checkpoint, ``--cfg-options``)::

    lrpet-dense compress seg CONFIG CHECKPOINT OUT [--cfg-options KEY=VALUE ...]

mmdet (the same conventions as mmseg; ``det-mm`` is another name of it)::

    lrpet-dense compress mmdet CONFIG CHECKPOINT OUT [--cfg-options KEY=VALUE ...]

The rank plan is read from the checkpoint (the LRPET hooks store it in every training checkpoint).
For a checkpoint without one (e.g. a dense model trained without LRPET), ``--plan-from-config``
computes it from the config's LRPET options, or ``--ratio P`` / ``--target-macs-cut C`` with the
config's layer selection. Every planned conv must already be of its planned rank (LRPET projects
after the last step); a checkpoint that is not is refused, unless ``--project`` asks to project it
first (a one-shot truncation: LRPET training does better). The factorised model's outputs are
checked against the dense model's in float64 before anything is written. Params and MACs of the
backbone and the whole model, before and after, are counted by the framework's own counter
(detectron2 ``FlopCountAnalysis``, ``mmengine.analysis.get_model_complexity_info``) on one
``--input-size`` input (default: the config's test size / crop size); ``--input-size`` changes only
that count, in both frameworks (a new plan is made at the config's ``plan_input_size``, else the
default size). Bad input: one ``error:`` line
on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Dict, List, Optional, Tuple

from .common import det_config, seg_config

__all__ = ["add_parser", "main_det", "main_seg", "main_mmdet"]


def _plan_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan-from-config", action="store_true",
                   help="for a checkpoint without an LRPET plan: compute it from the config's LRPET options")
    g.add_argument("--ratio", type=float, default=None,
                   help="for a checkpoint without an LRPET plan: one rank ratio p for the config's selection")
    g.add_argument("--target-macs-cut", type=float, default=None,
                   help="for a checkpoint without an LRPET plan: the fraction of backbone MACs to cut")
    p.add_argument("--project", action="store_true",
                   help="project the planned convs onto their rank before factorising (one-shot truncation), "
                        "for weights that are not already low-rank")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size of the params/MACs count only (default: the config's test size / crop size); "
                        "a new plan's input size is the config's plan_input_size (LRPET.PLAN_INPUT_SIZE)")


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="factorise an LRPET-trained checkpoint (det | seg | mmdet)",
                       description=__doc__.split("\n\n")[0])
    fw = p.add_subparsers(dest="framework", required=True, metavar="{det,seg,mmdet}")
    d = fw.add_parser("det", help="a detectron2 checkpoint")
    fill_det_parser(d)
    d.set_defaults(run=lambda args: _finish(lambda: _compress_det(args)))
    s = fw.add_parser("seg", help="an mmseg checkpoint")
    fill_seg_parser(s)
    s.set_defaults(run=lambda args: _finish(lambda: _compress_seg(args)))
    m = fw.add_parser("mmdet", aliases=["det-mm"], help="an mmdet checkpoint")
    fill_seg_parser(m)
    m.set_defaults(run=lambda args: _finish(lambda: _compress_mmdet(args)))


def fill_det_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "--config-file", dest="config_file", required=True, metavar="FILE")
    p.add_argument("--checkpoint", required=True, help="trained dense checkpoint (e.g. model_final.pth)")
    p.add_argument("--output", required=True, help="where to write the compressed checkpoint")
    _plan_options(p)
    p.add_argument("--no-flops", action="store_true", help="skip the FlopCountAnalysis report")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")


def fill_seg_parser(p: argparse.ArgumentParser) -> None:
    from lrpet_dense.cli.common import DictAction

    p.add_argument("config", help="the training config")
    p.add_argument("checkpoint", help="the trained (projected) checkpoint")
    p.add_argument("out", help="where to write the compressed checkpoint")
    _plan_options(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings (KEY=VALUE)")


def _finish(fn) -> int:
    try:
        return fn()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _config_changes(args) -> Dict[str, object]:
    """The plan options of the command line as config changes (for a checkpoint without a plan)."""
    if args.ratio is not None:
        return {"ratio": args.ratio, "target_macs_cut": None}
    if args.target_macs_cut is not None:
        return {"ratio": None, "target_macs_cut": args.target_macs_cut}
    return {}


def _choose_plan(args, from_checkpoint, build):
    """The checkpoint's plan, or ``build()`` when the command line asks for one; errors otherwise."""
    asked = args.plan_from_config or args.ratio is not None or args.target_macs_cut is not None
    if from_checkpoint is not None:
        if asked:
            raise ValueError(f"{args.checkpoint} carries an LRPET plan; --plan-from-config/--ratio/"
                             "--target-macs-cut apply only to checkpoints without one")
        return from_checkpoint, "the checkpoint's LRPET plan"
    if not asked:
        raise ValueError(f"{args.checkpoint} carries no LRPET plan (not an LRPET training checkpoint); pass "
                         "--plan-from-config, --ratio P or --target-macs-cut C (with --project, since its weights "
                         "are not low-rank)")
    return build(), "a new plan from the config"


def _print_complexity(before, after, hw: Tuple[int, int], counter: str) -> None:
    print(f"{counter} at {hw[0]}x{hw[1]} (one inference):")
    print(f"{'':10s}{'params before':>16s}{'params after':>16s}{'MACs before':>16s}{'MACs after':>16s}"
          f"{'params cut':>12s}{'MACs cut':>10s}")
    fmt = lambda n: f"{n / 1e9:.3f} G" if n >= 1e8 else f"{n / 1e6:.3f} M"  # noqa: E731
    for key in ("backbone", "model"):
        b, a = before[key], after[key]
        print(f"{key:10s}{fmt(b['params']):>16s}{fmt(a['params']):>16s}{fmt(b['macs']):>16s}{fmt(a['macs']):>16s}"
              f"{1 - a['params'] / max(b['params'], 1):>12.1%}{1 - a['macs'] / max(b['macs'], 1):>10.1%}")


def _compress_det(args) -> int:
    from detectron2.utils.logger import setup_logger

    from lrpet_dense.detectron2 import (build_plan, compress_model_, count_complexity, default_plan_hw, load_model,
                                        lrpet_config, pair_convs, plan_from_checkpoint, save_compressed)

    setup_logger(name="lrpet_dense")
    logger = setup_logger(name="detectron2")
    cfg = det_config(args.config_file, args.opts)
    config = lrpet_config(cfg).replace(**_config_changes(args))
    model, ckpt = load_model(cfg, args.checkpoint, dense_only=True)
    plan, source = _choose_plan(args, plan_from_checkpoint(ckpt), lambda: build_plan(
        model, pair_convs(model, config).layers, config, default_plan_hw(model, cfg)))
    logger.info("LRPET plan (%s):\n%s", source, plan.format_table())
    hw = tuple(args.input_size) if args.input_size else default_plan_hw(model, cfg)
    before = None if args.no_flops else count_complexity(model, hw)
    names = compress_model_(model, plan, project=args.project, config=config)
    after = None if args.no_flops else count_complexity(model, hw)
    save_compressed(model, args.output, meta={"source_checkpoint": args.checkpoint, "complexity_before": before,
                                               "complexity_after": after})
    print(f"factorised {len(names)} of {len(plan)} planned convs (ratio p={plan.ratio:g}); outputs checked against "
          f"the dense model in float64; wrote {args.output}")
    if before is not None:
        _print_complexity(before, after, hw, "detectron2 FlopCountAnalysis")
    return 0


def _compress_seg(args) -> int:
    import lrpet_dense.mmseg as lm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = seg_config(args.config, args.cfg_options)
    model, ckpt = lm.load_model(cfg, args.checkpoint, device=args.device, dense_only=True)
    changes = _config_changes(args)
    if args.plan_from_config or lm.config.hook_options(cfg) is not None:
        config = lm.lrpet_config(cfg, **changes)
    else:  # no hook in the config: the command line's ratio / cut with the default selection
        from lrpet_dense.core import LRPETConfig

        config = LRPETConfig(**changes)
    plan, source = _choose_plan(args, lm.plan_from_checkpoint(ckpt), lambda: lm.build_plan(
        model, lm.pair_convs(model, config).layers, config, lm.default_plan_hw(model, cfg)))
    hw = tuple(args.input_size) if args.input_size else lm.default_plan_hw(model, cfg)
    print(f"rank plan ({source}):\n{plan.format_table()}")
    before = lm.count_complexity(model, hw)
    names = lm.compress_model_(model, plan, project=args.project, config=config)
    after = lm.count_complexity(model, hw)
    print(f"factorised {len(names)} of {len(plan)} planned convs (the rest would not save MACs); logits checked "
          "against the dense model in float64")
    _print_complexity(before, after, hw, "mmengine.analysis.get_model_complexity_info")
    meta = {"dataset_meta": getattr(model, "dataset_meta", None), "source_checkpoint": args.checkpoint,
            "complexity_before": before, "complexity_after": after}
    lm.save_compressed(model, args.out, meta=meta)
    print(f"saved the compressed checkpoint to {args.out}")
    return 0


def _compress_mmdet(args) -> int:
    import lrpet_dense.mmdet as ld
    from lrpet_dense.mmdet.config import hook_options

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = seg_config(args.config, args.cfg_options)
    changes = _config_changes(args)
    # the config's options, checked before anything is built or loaded
    if args.plan_from_config or hook_options(cfg) is not None:
        config = ld.lrpet_config(cfg, **changes)
    else:  # no hook in the config: the command line's ratio / cut with the default selection
        from lrpet_dense.core import LRPETConfig

        config = LRPETConfig(**changes)
    model, ckpt = ld.load_model(cfg, args.checkpoint, device=args.device, dense_only=True)
    plan, source = _choose_plan(args, ld.plan_from_checkpoint(ckpt), lambda: ld.build_plan(
        model, ld.pair_convs(model, config).layers, config, ld.default_plan_hw(model, cfg)))
    hw = tuple(args.input_size) if args.input_size else ld.default_plan_hw(model, cfg)
    print(f"rank plan ({source}):\n{plan.format_table()}")
    before = ld.count_complexity(model, hw)
    names = ld.compress_model_(model, plan, project=args.project, config=config)
    after = ld.count_complexity(model, hw)
    print(f"factorised {len(names)} of {len(plan)} planned convs (the rest would not save MACs); raw outputs "
          "(features, head scores and deltas before NMS) checked against the dense model in float64")
    _print_complexity(before, after, hw, "mmengine.analysis.get_model_complexity_info")
    meta = {"dataset_meta": getattr(model, "dataset_meta", None), "source_checkpoint": args.checkpoint,
            "complexity_before": before, "complexity_after": after}
    ld.save_compressed(model, args.out, meta=meta)
    print(f"saved the compressed checkpoint to {args.out} (model type {ld.ADAPTER.lrpet_type_name(model)})")
    return 0


def main_det(argv: Optional[List[str]] = None) -> int:
    """``tools/compress_det.py``: exit status (2 with one ``error:`` line for bad input)."""
    p = argparse.ArgumentParser(prog="compress_det.py", description=__doc__.split("\n\n")[0])
    fill_det_parser(p)
    return _finish(lambda: _compress_det(p.parse_args(argv)))


def main_seg(argv: Optional[List[str]] = None) -> int:
    """``tools/compress_seg.py``: exit status (2 with one ``error:`` line for bad input)."""
    p = argparse.ArgumentParser(prog="compress_seg.py", description=__doc__.split("\n\n")[0])
    fill_seg_parser(p)
    return _finish(lambda: _compress_seg(p.parse_args(argv)))


def main_mmdet(argv: Optional[List[str]] = None) -> int:
    """``lrpet-dense compress mmdet`` on its own: exit status (2 with one ``error:`` line for bad input)."""
    p = argparse.ArgumentParser(prog="lrpet-dense compress mmdet", description=__doc__.split("\n\n")[0])
    fill_seg_parser(p)
    return _finish(lambda: _compress_mmdet(p.parse_args(argv)))
