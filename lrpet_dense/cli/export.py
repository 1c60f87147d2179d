"""``lrpet-dense export det|seg|mmdet``: a (compressed) model to ONNX, checked in ONNX Runtime against PyTorch.

detectron2 (its export path: ``TracingAdapter`` + the TorchScript ONNX exporter, as detectron2's
``tools/deploy/export_model.py``)::

    lrpet-dense export det --config faster_rcnn_lrpet.yaml --checkpoint compressed.pth --output model.onnx

mmseg (the segmentor in ``mode='tensor'``: logits, through torch's dynamo ONNX exporter)::

    lrpet-dense export seg CONFIG compressed.pth model.onnx

mmdet (the network up to its raw outputs: features, RPN / dense head and ROI head scores and deltas,
through the TorchScript ONNX exporter; box decoding and NMS stay in PyTorch, see
``lrpet_dense/mmdet/onnx.py``)::

    lrpet-dense export mmdet CONFIG compressed.pth model.onnx

The model is put in its inference form first (BatchNorms folded into the convs, checked in float64
against the model as loaded; ``--keep-bn`` skips that), exported for one ``--input-size`` input
(default: the config's test size / crop size), run in ONNX Runtime and compared with PyTorch on the
same input: mmseg's logits within float32 tolerance; detectron2's detector stage by stage, each stage on
the same inputs in both runtimes (RPN head and box predictor outputs within float32 tolerance; the
proposals and detections must be a selection detectron2's NMS and top-k could make from the same
candidates, as ties may break either way). The check is printed; a failed check is exit status 2 and
the file is not kept. The file is self-contained (the weights inside it; above protobuf's 2 GB they are
in ``NAME.onnx.data`` beside it, named in the success line), checked in ONNX Runtime in a folder of its
own before it is moved into place, so it runs wherever it is moved; no temporary file is left behind. Factorised ranks are zero-padded to multiples of ``--align-ranks`` (16) in the file:
exact (the added channels are zeros; the check above compares the file with the model as loaded), a
few more MACs, and 9-15% less ONNX Runtime latency for the backbones of unaligned plans (whole models
5-13%) measured on an AVX-512 Xeon (``benchmarks/README.md``).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .common import DictAction

__all__ = ["add_parser", "main"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size of the exported graph (default: the config's test size / crop size)")
    p.add_argument("--keep-bn", action="store_true", help="export without folding BatchNorm into the convs")
    p.add_argument("--align-ranks", type=_multiple, default=16, metavar="N",
                   help="zero-pad factorised ranks to multiples of N in the file (exact; ONNX Runtime runs aligned "
                        "ranks faster). Default 16; 1 turns it off")


def _multiple(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def fill_parser(parser: argparse.ArgumentParser) -> None:
    fw = parser.add_subparsers(dest="framework", required=True, metavar="{det,seg,mmdet}")
    d = fw.add_parser("det", help="a detectron2 checkpoint (dense or compressed)")
    d.add_argument("--config", "--config-file", dest="config_file", required=True, metavar="FILE")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("--output", required=True, help="the .onnx file to write")
    _common(d)
    d.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    d.set_defaults(run=lambda a: _guarded(_export_det, a))
    s = fw.add_parser("seg", help="an mmseg checkpoint (dense or compressed)")
    s.add_argument("config")
    s.add_argument("checkpoint")
    s.add_argument("output", help="the .onnx file to write")
    _common(s)
    s.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings (KEY=VALUE)")
    s.set_defaults(run=lambda a: _guarded(_export_seg, a))
    m = fw.add_parser("mmdet", aliases=["det-mm"], help="an mmdet checkpoint (dense or compressed)")
    m.add_argument("config")
    m.add_argument("checkpoint")
    m.add_argument("output", help="the .onnx file to write")
    _common(m)
    m.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings (KEY=VALUE)")
    m.set_defaults(run=lambda a: _guarded(_export_mmdet, a))


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a (compressed) model to ONNX and check it in ONNX Runtime (det | seg | mmdet)",
                       description=__doc__.split("\n\n")[0])
    fill_parser(p)


def _report(result: dict, path: str, model, multiple: int) -> int:
    from lrpet_dense.core.deploy import unaligned_ranks

    check = ", ".join(f"{'output ' + k if k.isdigit() else k} {v:.3g}" for k, v in result["check"].items())
    files = result.get("files") or [path]
    written = path if len(files) == 1 else (f"{path} and its weights {', '.join(files[1:])} (above protobuf's 2 GB; "
                                            "keep the files together)")
    print(f"wrote {written}: {result['inputs']} -> {result['outputs']} outputs; ONNX Runtime vs PyTorch on the same "
          f"input, max |difference| (within float32 tolerance): {check or 'no outputs'}")
    if result["aligned"]:
        print(f"ranks of {len(result['aligned'])} factorised convs zero-padded to multiples of {multiple} in the file "
              "(exact; for the runtime's vector width)")
    names, total = unaligned_ranks(model, 16, paddable=True) if multiple == 1 else ([], 0)
    if names:
        print(f"note: {len(names)} of {total} factorised convs have ranks that are not multiples of 16 (e.g. {names[0]}); "
              "CPU runtimes, ONNX Runtime above all, run aligned ranks markedly faster (benchmarks/README.md, "
              "'Deploy path latency'): export without --align-ranks 1 (it pads them to 16), or plan with "
              "rank_multiple=16 (LRPET.RANK_MULTIPLE)")
    return 0


def _export_det(args) -> int:
    from lrpet_dense.detectron2 import default_plan_hw, export_onnx, load_model, to_inference_

    from .common import det_config

    cfg = det_config(args.config_file, args.opts)
    model, _ = load_model(cfg, args.checkpoint)
    hw = tuple(args.input_size) if args.input_size else default_plan_hw(model, cfg)
    if not args.keep_bn:
        to_inference_(model)
    return _report(export_onnx(model, args.output, hw, align_ranks=args.align_ranks), args.output, model,
                   args.align_ranks)


def _export_seg(args) -> int:
    from lrpet_dense.mmseg import default_plan_hw, export_onnx, load_model, to_inference_

    from .common import seg_config

    cfg = seg_config(args.config, args.cfg_options)
    model, _ = load_model(cfg, args.checkpoint)
    hw = tuple(args.input_size) if args.input_size else default_plan_hw(model, cfg)
    if not args.keep_bn:
        to_inference_(model)
    return _report(export_onnx(model, args.output, hw, align_ranks=args.align_ranks), args.output, model,
                   args.align_ranks)


def _export_mmdet(args) -> int:
    from lrpet_dense.mmdet import default_plan_hw, export_onnx, load_model, to_inference_

    from .common import seg_config

    cfg = seg_config(args.config, args.cfg_options)
    model, _ = load_model(cfg, args.checkpoint)
    hw = tuple(args.input_size) if args.input_size else default_plan_hw(model, cfg)
    if not args.keep_bn:
        to_inference_(model)
    return _report(export_onnx(model, args.output, hw, align_ranks=args.align_ranks), args.output, model,
                   args.align_ranks)


def main(argv: Optional[List[str]] = None) -> int:
    """The subcommand on its own (exit status; 2 with one ``error:`` line for bad input or a failed check)."""
    parser = argparse.ArgumentParser(prog="lrpet-dense export", description=__doc__.split("\n\n")[0])
    fill_parser(parser)
    args = parser.parse_args(argv)
    return args.run(args)


def _guarded(fn, args) -> int:
    try:
        return fn(args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # a file that failed its check was never written
        print(f"error: {e}", file=sys.stderr)
        return 2
