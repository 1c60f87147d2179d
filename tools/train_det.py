#!/usr/bin/env python
"""Train / evaluate detectron2 Faster R-CNN with LRPET: ``lrpet-dense train-det`` (see lrpet_dense/cli/train_det.py).

    python tools/train_det.py --config configs/faster_rcnn_lrpet.yaml [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]
"""
import sys

from lrpet_dense.cli.train_det import get_parser, main, run  # noqa: F401  (main: detectron2's launch target)

if __name__ == "__main__":
    sys.exit(run())
