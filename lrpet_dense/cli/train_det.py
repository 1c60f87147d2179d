"""``lrpet-dense train-det``: train / evaluate detectron2 Faster R-CNN with LRPET low-rank projection.

The detectron2 way (as ``projects/DeepLab/train_net.py``)::

    lrpet-dense train-det --config configs/faster_rcnn_lrpet.yaml [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]
    python tools/train_det.py --config configs/faster_rcnn_lrpet.yaml ...   # the same

``--config`` and detectron2's own ``--config-file`` are the same option. The trainer is
:class:`~lrpet_dense.detectron2.LRPETTrainer` (what makes LRPET training correct lives there, for every
trainer) with VOC/COCO evaluators. With ``LRPET.ENABLED`` the :class:`~lrpet_dense.detectron2.LRPETHook`
is placed before the ``PeriodicCheckpointer``, so every checkpoint and ``model_final.pth`` are exactly
low-rank. ``--eval-only MODEL.WEIGHTS compressed.pth``
evaluates a checkpoint written by ``lrpet-dense compress det``, whatever ``MODEL.META_ARCHITECTURE``;
a compressed ``MODEL.WEIGHTS`` with ``LRPET.ENABLED False`` fine-tunes the factorised model.

Datasets: the VOC configs use detectron2's builtin ``voc_2007_*``/``voc_2012_*`` names under
``$DETECTRON2_DATASETS``; when ``$LRPET_TOY_VOC`` names a toy ``VOCdevkit`` (``python -m
lrpet_dense.data.toy_voc OUT``), ``voc_toy_2007_*`` / ``voc_toy3_2007_*`` are registered for the toy configs.
"""
import argparse
import os
import sys
from typing import List, Optional

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator, verify_results
from detectron2.utils.logger import setup_logger

from lrpet_dense.detectron2 import CompressedAwareCheckpointer, LRPETTrainer, register_toy_voc_from_env
from lrpet_dense.io import check_checkpoint_file


class Trainer(LRPETTrainer):
    """:class:`~lrpet_dense.detectron2.LRPETTrainer` (LRPET, compressed-checkpoint guards, exact
    ``--resume``) with VOC/COCO evaluators."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
        raise NotImplementedError(f"no evaluator for dataset {dataset_name!r} of type {evaluator_type!r}")


def load_config(args):
    """The frozen config, every LRPET option checked (:func:`lrpet_dense.cli.common.det_config`), and the
    local ``MODEL.WEIGHTS`` checked to be a complete file: nothing is built or written yet.

    Raises:
        ValueError: a LazyConfig or other Python config, an unknown key, an LRPET option out of range, an
            empty or truncated weights file.
        FileNotFoundError: no such config or weights file.
    """
    from lrpet_dense.configs import resolve

    from .common import det_config

    args.config_file = resolve(args.config_file)  # detectron2's default_setup logs and copies this file
    cfg = det_config(args.config_file, args.opts, register=False)
    if cfg.MODEL.WEIGHTS and "://" not in cfg.MODEL.WEIGHTS and (args.eval_only or not args.resume):
        # A missing or truncated local file: a clear error naming it, before anything is built.
        check_checkpoint_file(cfg.MODEL.WEIGHTS)
    return cfg


def setup(args):
    """Create the config, with the LRPET keys (checked: :func:`load_config`), and do detectron2's basic
    setup (which writes ``config.yaml`` and the log in ``OUTPUT_DIR``).

    ``--config`` is a file, or the name of a config shipped with lrpet_dense (``faster_rcnn_lrpet.yaml``,
    ``toy/faster_rcnn_lrpet_toy.yaml``; :func:`lrpet_dense.configs.resolve`).
    """
    cfg = load_config(args)
    default_setup(cfg, args)
    # detectron2 projects log through their own package logger (e.g. PointSup's "point_sup").
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="lrpet_dense")
    register_toy_voc_from_env()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        CompressedAwareCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                                    resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser() -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` plus ``--config`` (same as ``--config-file``)."""
    parser = default_argument_parser()
    parser.add_argument("--config", dest="config_file", metavar="FILE", default=argparse.SUPPRESS,
                        help="path to config file (same as --config-file)")
    return parser


def run(argv: Optional[List[str]] = None) -> int:
    """Parse detectron2's command line (``--config``, ``--num-gpus``, ``--resume``, ``--eval-only``, ``KEY VALUE``)
    and train or evaluate under detectron2's ``launch``; returns the exit status.

    The config is read and checked first (:func:`load_config`): bad input (a LazyConfig, an unknown key, an
    LRPET option out of range, a missing weights file) is one ``error:`` line on stderr and exit status 2,
    with nothing built or written.
    """
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("a config file is required: --config configs/faster_rcnn_lrpet.yaml")
    try:
        load_config(argparse.Namespace(**vars(args)))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0
