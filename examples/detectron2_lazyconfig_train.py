#!/usr/bin/env python
"""detectron2's ``tools/lazyconfig_train_net.py`` with LRPET: train / evaluate any LazyConfig detector.

    python examples/detectron2_lazyconfig_train.py --config-file CONFIG.py [--num-gpus N] [--resume] \\
        [--eval-only] [key=value ...]

The config is an ordinary detectron2 LazyConfig (``model``, ``dataloader``, ``optimizer``,
``lr_multiplier``, ``train``) plus ``lrpet = dict(...)``: the fields of ``LRPETConfig`` (e.g.
``lrpet = dict(target_macs_cut=0.5, interval=500)``); without it (or with ``lrpet.enabled=False`` on the
command line), the script trains without LRPET.
The lines marked ``# LRPET`` are all that differs from detectron2's script (``docs/detectron2.md``).
``train.init_checkpoint`` may be a compressed checkpoint: evaluated (``--eval-only``) or fine-tuned
(with LRPET off) whatever the model's type.
"""
import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (AMPTrainer, SimpleTrainer, default_argument_parser, default_setup, default_writers,
                               hooks, launch)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from lrpet_dense.detectron2 import (CompressedAwareCheckpointer, LRPETHook, RNGStateHook, lrpet_config,  # LRPET
                                    lrpet_enabled, prepare_model_, register_toy_voc_from_env, rng_preserving,
                                    train_loader_seed)

logger = logging.getLogger("detectron2")


def do_test(cfg, model):
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)
    prepare_model_(model, cfg.train.init_checkpoint)  # LRPET: a compressed checkpoint is factorised now

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)

    cfg.dataloader.train.seed = train_loader_seed(cfg.train.get("seed", -1))  # LRPET: exact --resume
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    checkpointer = CompressedAwareCheckpointer(  # LRPET: strict, refuses a model factorised by loading
        model, cfg.train.output_dir, for_training=True, trainer=trainer
    )
    lrpet = LRPETHook(model, lrpet_config(cfg)) if lrpet_enabled(cfg) else None  # LRPET: before the checkpointer
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            lrpet,
            RNGStateHook(cfg.train.checkpointer.period, cfg.train.max_iter),  # LRPET: exact --resume
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, rng_preserving(lambda: do_test(cfg, model))),  # LRPET
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        # The checkpoint stores the training iteration that just finished, thus we start
        # at the next iteration
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if lrpet_enabled(cfg):
        lrpet_config(cfg)  # LRPET: every option checked before anything is built or written
    default_setup(cfg, args)
    setup_logger(output=cfg.train.output_dir, distributed_rank=comm.get_rank(), name="lrpet_dense")  # LRPET: logs
    register_toy_voc_from_env()  # the toy VOC set of the tests and docs, when $LRPET_TOY_VOC names one

    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        prepare_model_(model, cfg.train.init_checkpoint)  # LRPET: compressed checkpoints, any model type
        model = create_ddp_model(model)
        CompressedAwareCheckpointer(model).load(cfg.train.init_checkpoint)  # LRPET
        print(do_test(cfg, model))
    else:
        do_train(args, cfg)


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
