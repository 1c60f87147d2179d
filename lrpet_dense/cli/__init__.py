"""``lrpet-dense``: the command line of lrpet_dense.

    lrpet-dense train-det --config faster_rcnn_lrpet.yaml [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]
    lrpet-dense compress det --config CFG --checkpoint model_final.pth --output compressed.pth [KEY VALUE ...]
    lrpet-dense compress seg CONFIG CHECKPOINT OUT [--cfg-options KEY=VALUE ...]
    lrpet-dense compress mmdet CONFIG CHECKPOINT OUT [--cfg-options KEY=VALUE ...]
    lrpet-dense report det|seg|mmdet|summary ...
    lrpet-dense export det|seg|mmdet ...          (ONNX)
    lrpet-dense search det|seg|mmdet ...          (per-stage rank ratios by Bayesian optimisation)
    lrpet-dense config-path NAME            (the path of a shipped config)

Each subcommand imports its framework only when it runs, so ``lrpet-dense --help`` is quick. mmseg and
mmdet training stay their own ``tools/train.py`` with ``custom_hooks=[dict(type='LRPETHook', ...)]``;
``tools/*.py`` in a checkout are thin wrappers around these subcommands.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _add_train_det(sub) -> None:
    p = sub.add_parser("train-det", add_help=False, help="train / evaluate detectron2 Faster R-CNN with LRPET "
                       "(detectron2's own command line; --help for its options)")
    p.add_argument("args", nargs=argparse.REMAINDER)

    def run(args) -> int:
        from .train_det import run as train

        return train(args.args)

    p.set_defaults(run=run)


def _add_config_path(sub) -> None:
    p = sub.add_parser("config-path", help="print the path of a config shipped with lrpet_dense (or list them)")
    p.add_argument("name", nargs="?", help="e.g. faster_rcnn_lrpet.yaml or toy/pspnet_r50-d8_lrpet_toy.py")
    p.add_argument("--list", action="store_true", help="list the shipped configs")
    p.add_argument("--dir", action="store_true", help="print the folder of the shipped configs")

    def run(args) -> int:
        from lrpet_dense.configs import config_dir, config_path, list_configs

        if args.dir:
            print(config_dir())
            return 0
        if args.list or not args.name:
            print("\n".join(list_configs()))
            return 0
        try:
            print(config_path(args.name))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    from lrpet_dense import __version__

    from . import compress, export, report, search

    parser = argparse.ArgumentParser(prog="lrpet-dense", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"lrpet-dense {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_det(sub)
    compress.add_parser(sub)
    report.add_parser(sub)
    export.add_parser(sub)
    search.add_parser(sub)
    _add_config_path(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``lrpet-dense``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-det"]:
        # argparse's REMAINDER does not take arguments that start with "-" right after a subcommand,
        # so detectron2's own command line (``--config ...``) is handed over as it is.
        from .train_det import run as train

        return train(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
