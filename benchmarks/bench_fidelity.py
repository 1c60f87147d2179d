#!/usr/bin/env python
"""Fidelity: what accuracy LRPET keeps, against the dense model and the alternatives, at equal MACs.

The paper's protocol on a generated proxy task (:mod:`lrpet_dense.data.proxy_voc`: eight shape x texture
classes, small overlapping objects, distractors, varied backgrounds; real JPEG/XML/PNG read by the
frameworks' own VOC loaders and evaluators):

1. train the dense model from random initialisation (the stand-in for pretrained weights), once;
2. from it, at the same backbone MACs cut (30% and 50%) and the same fine-tuning budget (iterations,
   poly schedule annealed to 1e-4, data order per seed), for every seed:

   ============== ======================================================================================
   dense-ft       the dense model fine-tuned alike (the reference: it must stay at the dense level)
   svd            truncated SVD (rank-k projection, no ET, no BNR), factorised, no fine-tuning
   svd-energy     the same with the energy rank allocation (same MACs), no fine-tuning
   svd-ft         truncated SVD factorised, then the factorised model fine-tuned (decompose-then-fine-tune)
   lrp            LRPET training without ET and BNR (projection every ``interval`` steps), then factorised
   lrp-et         with energy transfer
   lrpet          with energy transfer and BN rectification (the method)
   lrpet-energy   LRPET with the energy rank allocation instead of one ratio
   prune-ft       structured channel pruning (Torch-Pruning, group-norm importance) to the MACs of the
                  factorised LRPET model, then fine-tuned alike
   lrpet-scratch  LRPET from random initialisation, with the dense model's training budget
   ============== ======================================================================================

Segmentation (PSPNet R50-D8, mmseg's runner) runs every row on the proxy; detection (Faster R-CNN
R50-C4, detectron2's trainer) runs dense, svd, dense-ft and lrpet. Detection uses the quickstart's
easier toy set (:mod:`lrpet_dense.data.toy_voc`: three classes of large drawn shapes, 128 px): R50-C4
from random initialisation did not learn the proxy within the budget (AP50 0.5 after 400 iterations,
measured), while on the toy set it reaches a level at which compression visibly costs accuracy.
Every model is evaluated by the framework's own evaluator (mmseg ``IoUMetric``: mIoU; detectron2
``PascalVOCDetectionEvaluator``: AP50) on the test split, and its backbone MACs are counted by the
framework's own counter.

Validity is checked and printed: the harness's evaluation of the dense checkpoint equals the framework's
own tool on the same file (mmseg ``tools/test.py``; ``lrpet-dense train-det --eval-only``); dense-ft stays
within noise of dense; the gap between dense and svd (no fine-tuning) exceeds three seed standard
deviations (else the task is too easy to rank methods). A difference between two rows is called real only
where their mean +- std intervals do not overlap.

Runs are independent jobs on ``--workers`` processes (default 2, one torch thread each: on 2 cores this
is ~25% faster than one process with two threads).

    python benchmarks/bench_fidelity.py                 # full run (46.5 min on 2 idle Intel Xeon cores)
    python benchmarks/bench_fidelity.py --quick         # one seed, the 50% cut, shorter training (8 min)
    python benchmarks/bench_fidelity.py --device cuda --voc-root /data/VOCdevkit   # real VOC on a GPU

Results: ``OUT/fidelity.{json,md,png}`` (``--out``, default ``output/fidelity``); ``--results`` copies them
to ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from _common import cpu_name  # benchmarks/_common.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEG_METHODS = ("dense-ft", "svd", "svd-energy", "svd-ft", "lrp", "lrp-et", "lrpet", "lrpet-energy", "prune-ft",
               "lrpet-scratch")
DET_METHODS = ("dense-ft", "svd", "lrpet")
#: method -> (energy transfer, BN rectification, rank policy) of its projection
_PROJECTION = {"svd": (False, False, "uniform"), "svd-energy": (False, False, "energy"), "svd-ft": (False, False, "uniform"),
               "lrp": (False, False, "uniform"), "lrp-et": (True, False, "uniform"), "lrpet": (True, True, "uniform"),
               "lrpet-energy": (True, True, "energy"), "lrpet-scratch": (True, True, "uniform"),
               "lrpet-searched": (True, True, "uniform")}


@dataclass(frozen=True)
class Budget:
    """Iterations and sizes of one benchmark mode."""

    seg_pretrain: int = 500      # dense training from random init (also lrpet-scratch's budget)
    seg_finetune: int = 50       # every fine-tune
    det_pretrain: int = 450      # the quickstart's schedule
    det_finetune: int = 50
    projections: int = 5         # LRPET projections per fine-tune (interval = fine-tune // projections)
    seeds: int = 3
    cuts: Tuple[float, ...] = (0.3, 0.5)
    scratch_cuts: Tuple[float, ...] = (0.5,)
    det_cuts: Tuple[float, ...] = (0.5,)
    train_images: int = 160
    test_images: int = 40
    image_size: int = 96
    crop: int = 64
    batch: int = 4
    prune_search_steps: int = 10  # bisection steps of the pruning ratio that matches the MACs
    det_train_images: int = 64   # the detection toy set (the quickstart's)
    det_test_images: int = 16
    det_image_size: int = 128


FULL = Budget()
QUICK = Budget(seg_pretrain=120, seg_finetune=24, det_pretrain=120, det_finetune=24, seeds=1, cuts=(0.5,),
               scratch_cuts=(0.5,), det_cuts=(0.5,))
TINY = Budget(seg_pretrain=2, seg_finetune=2, det_pretrain=2, det_finetune=2, projections=1, seeds=1, cuts=(0.5,),
              scratch_cuts=(0.5,), det_cuts=(0.5,), train_images=4, test_images=2, prune_search_steps=3,
              det_train_images=2, det_test_images=2)


@dataclass(frozen=True)
class Job:
    framework: str              # "seg" | "det"
    kind: str                   # "pretrain" | "validate" | "oneshot" | "finetune" | "scratch"
    method: str = "dense"
    cut: Optional[float] = None
    seed: int = 0
    #: per-group ratios instead of one ratio solved for ``cut`` (``lrpet-searched``: a searched plan)
    overrides: Optional[Tuple[Tuple[str, float], ...]] = None

    @property
    def name(self) -> str:
        tag = f"{self.framework}_{self.kind}_{self.method}_{self.cut}_{self.seed}"
        if self.overrides:
            import hashlib

            tag += "_" + hashlib.sha1(repr(self.overrides).encode()).hexdigest()[:10]
        return tag


@dataclass
class Setup:
    """What every job needs to know (picklable)."""

    out: str
    data_root: str              # folder holding VOCdevkit
    budget: Budget
    device: str = "cpu"
    threads: int = 1
    voc: bool = False           # real VOC (VOC2007 detection / VOC2012 aug segmentation) instead of the proxy
    lr_seg: float = 0.01
    lr_det: float = 0.01
    extra: Dict[str, Any] = field(default_factory=dict)


# =============================================================================== segmentation (mmseg)
def _seg_cfg(setup: Setup, work_dir: str, iters: int, lr: float, seed: int, warmup: int = 0):
    from mmengine.config import Config

    from lrpet_dense.configs import config_path

    b = setup.budget
    os.environ["LRPET_TOY_VOC_ROOT"] = setup.data_root
    cfg = Config.fromfile(config_path("toy/pspnet_r50-d8_lrpet_toy.py"))
    cfg.work_dir = work_dir
    cfg.experiment_name = f"{os.path.basename(work_dir)}_{os.getpid()}_{time.time_ns()}"
    cfg.model.data_preprocessor.size = (b.crop, b.crop)
    cfg.model.pretrained = None
    cfg.train_dataloader.batch_size = b.batch
    pipe = cfg.train_dataloader.dataset.pipeline
    pipe[2] = dict(type="RandomResize", scale=(b.image_size, b.image_size), ratio_range=(0.75, 1.5), keep_ratio=True)
    pipe[3] = dict(type="RandomCrop", crop_size=(b.crop, b.crop), cat_max_ratio=0.75)
    cfg.test_dataloader.dataset.pipeline[1] = dict(type="Resize", scale=(b.image_size, b.image_size), keep_ratio=True)
    cfg.val_dataloader = cfg.test_dataloader
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=10 ** 9)
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=max(iters // 4, 1), log_metric_by_epoch=False)
    cfg.custom_hooks = []
    cfg.log_level = "WARNING"
    cfg.optim_wrapper.optimizer.lr = lr
    sched = [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=warmup, end=iters, by_epoch=False)]
    if warmup:
        sched.insert(0, dict(type="LinearLR", start_factor=0.1, begin=0, end=warmup, by_epoch=False))
    cfg.param_scheduler = sched
    cfg.randomness = dict(seed=seed)
    cfg.device = setup.device
    return cfg


def _seg_runner(cfg, model=None):
    """``Runner.from_cfg(cfg)``, or the same runner around an already built model instance."""
    from mmengine.runner import Runner

    if model is None:
        return Runner.from_cfg(cfg)
    keys = ("work_dir", "train_dataloader", "val_dataloader", "test_dataloader", "train_cfg", "val_cfg", "test_cfg",
            "auto_scale_lr", "optim_wrapper", "param_scheduler", "val_evaluator", "test_evaluator", "default_hooks",
            "custom_hooks", "data_preprocessor", "load_from", "resume", "launcher", "env_cfg", "log_processor",
            "log_level", "visualizer", "default_scope", "randomness", "experiment_name")
    kwargs = {k: cfg.get(k) for k in keys if k in cfg}
    return Runner(model=model, cfg=cfg, **kwargs)


def _seg_eval(cfg, model) -> float:
    from lrpet_dense.mmseg.report import evaluate_segmentor

    return float(evaluate_segmentor(cfg, model)["mIoU"])


def _seg_macs(model, setup: Setup) -> Dict[str, int]:
    from lrpet_dense.mmseg import count_complexity

    s = setup.budget.image_size
    return count_complexity(model.cpu(), (s, s))["backbone"]


def _seg_plan(model, cut: float, method: str):
    import lrpet_dense.mmseg as lm
    from lrpet_dense.core import LRPETConfig

    et, bnr, policy = _PROJECTION[method]
    config = LRPETConfig(target_macs_cut=cut, energy_transfer=et, bn_rectification=bnr, rank_policy=policy)
    return config, lm.build_plan(model, lm.pair_convs(model, config).layers, config)


def _dense_path(setup: Setup, fw: str) -> str:
    return os.path.join(setup.out, "checkpoints", f"{fw}_dense.pth")


def _svd_path(setup: Setup, fw: str, cut: float) -> str:
    return os.path.join(setup.out, "checkpoints", f"{fw}_svd_{cut:g}.pth")


def seg_job(setup: Setup, job: Job) -> Dict[str, Any]:
    import torch

    import lrpet_dense.mmseg as lm

    b = setup.budget
    work = os.path.join(setup.out, "runs", job.name)
    os.makedirs(work, exist_ok=True)
    dense_ckpt = _dense_path(setup, "seg")
    result: Dict[str, Any] = {}
    if job.kind == "pretrain":
        cfg = _seg_cfg(setup, work, b.seg_pretrain, setup.lr_seg, job.seed, warmup=min(20, b.seg_pretrain // 4))
        runner = _seg_runner(cfg)
        runner.train()
        model = lm.unwrap_model(runner.model)
        os.makedirs(os.path.dirname(dense_ckpt), exist_ok=True)
        torch.save({"meta": {"dataset_meta": getattr(model, "dataset_meta", None)}, "state_dict": model.state_dict()},
                   dense_ckpt)
        return {"value": _seg_eval(cfg, model), "macs": _seg_macs(model, setup), "iters": b.seg_pretrain}
    if job.kind == "validate":  # the harness's evaluation of the dense checkpoint == mmseg's own tools/test.py
        cfg = _seg_cfg(setup, work, 1, setup.lr_seg, 0)
        model, _ = lm.load_model(cfg, dense_ckpt)
        cfg_file = os.path.join(work, "test_cfg.py")
        cfg.log_level = "INFO"  # mmseg's test tool prints the metrics at INFO
        cfg.dump(cfg_file)
        import mmseg

        tool = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "tools", "test.py")
        env = dict(os.environ, LRPET_TOY_VOC_ROOT=setup.data_root, OMP_NUM_THREADS=str(setup.threads))
        proc = subprocess.run([sys.executable, tool, cfg_file, dense_ckpt, "--work-dir", os.path.join(work, "tool")],
                              env=env, capture_output=True, text=True, cwd=work)
        import re

        found = re.findall(r"mIoU: ([\d.]+)", proc.stdout + proc.stderr)
        return {"value": _seg_eval(cfg, model), "tool_value": float(found[-1]) if found else None,
                "tool_rc": proc.returncode}
    if job.kind == "oneshot":  # truncated SVD (uniform or energy ranks), factorised, no fine-tuning
        cfg = _seg_cfg(setup, work, 1, setup.lr_seg, 0)
        model, _ = lm.load_model(cfg, dense_ckpt)
        config, plan = _seg_plan(model, job.cut, job.method)
        lm.compress_model_(model, plan, project=True, config=config)
        if job.method == "svd":
            lm.save_compressed(model, _svd_path(setup, "seg", job.cut))
        return {"value": _seg_eval(cfg, model), "macs": _seg_macs(model, setup), "plan_cut": plan.reached_macs_cut}
    # fine-tunes (and LRPET from scratch)
    iters = b.seg_pretrain if job.kind == "scratch" else b.seg_finetune
    cfg = _seg_cfg(setup, work, iters, setup.lr_seg * (1.0 if job.kind == "scratch" else 0.5), job.seed,
                   warmup=min(20, iters // 4) if job.kind == "scratch" else 0)
    model = None
    if job.method in ("lrp", "lrp-et", "lrpet", "lrpet-energy", "lrpet-scratch", "lrpet-searched"):
        et, bnr, policy = _PROJECTION[job.method]
        rank = dict(overrides=dict(job.overrides)) if job.overrides else dict(target_macs_cut=job.cut)
        cfg.custom_hooks = [dict(type="LRPETHook", interval=max(iters // b.projections, 1), energy_transfer=et,
                                 bn_rectification=bnr, rank_policy=policy, **rank)]
        if job.kind != "scratch":
            cfg.load_from = dense_ckpt
    elif job.method == "dense-ft":
        cfg.load_from = dense_ckpt
    elif job.method == "svd-ft":  # the factorised model, built so before the optimizer, then fine-tuned
        cfg.model.factorized_from = _svd_path(setup, "seg", job.cut)
        cfg.load_from = _svd_path(setup, "seg", job.cut)
    elif job.method == "prune-ft":
        model, pruning = _pruned_segmentor(setup, cfg, dense_ckpt, job.cut)
        result["pruning"] = pruning
    runner = _seg_runner(cfg, model)
    runner.train()
    model = lm.unwrap_model(runner.model)
    if cfg.custom_hooks:  # LRPET: the hook projected after the last step; factorise with its plan (checked)
        hook = next(h for h in runner.hooks if type(h).__name__ == "LRPETHook")
        lm.compress_model_(model, hook.plan)
        result["plan_cut"] = hook.plan.reached_macs_cut
    result.update(value=_seg_eval(cfg, model), macs=_seg_macs(model, setup), iters=iters)
    return result


def _pruned_segmentor(setup: Setup, cfg, dense_ckpt: str, cut: float):
    """The dense model pruned by Torch-Pruning (group-norm importance, backbone channels only) to the
    backbone MACs of the factorised LRPET model at ``cut`` (the pruning ratio is bisected to match)."""
    import copy as _copy

    import torch
    import torch_pruning as tp

    import lrpet_dense.mmseg as lm

    dense, _ = lm.load_model(cfg, dense_ckpt)
    config, plan = _seg_plan(dense, cut, "lrpet")
    target = _factorized_macs(dense, plan, setup)
    s = setup.budget.image_size
    example = torch.randn(1, 3, s, s)

    def prune(ratio: float):
        model = _copy.deepcopy(dense).eval()
        ignored = [m for n, m in model.named_modules() if n.startswith(("decode_head", "auxiliary_head")) and
                   isinstance(m, torch.nn.Conv2d)]
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ignored, round_to=8, forward_fn=_all_heads)
        pruner.step()
        return model, _seg_macs(model, setup)["macs"]

    lo, hi, best = 0.0, 0.95, None
    for _ in range(setup.budget.prune_search_steps):  # the smallest ratio whose backbone has at most the target MACs
        mid = (lo + hi) / 2
        model, macs = prune(mid)
        if macs <= target:
            hi, best = mid, (model, macs, mid)
        else:
            lo = mid
    if best is None:
        best = (*prune(hi), hi)
    model, macs, ratio = best
    return model.train(), {"ratio": ratio, "macs": macs, "target_macs": target}


def _all_heads(model, x):
    """A forward through the backbone and both heads (the auxiliary one trains too), for the pruner's graph."""
    feats = model.extract_feat(x)
    outs = [model.decode_head(feats)]
    if getattr(model, "auxiliary_head", None) is not None:
        outs.append(model.auxiliary_head(feats))
    return outs


def _factorized_macs(dense, plan, setup: Setup) -> int:
    import copy as _copy

    from lrpet_dense.core import factorize_

    model = _copy.deepcopy(dense)
    factorize_(model, plan, from_weights=False)
    return _seg_macs(model, setup)["macs"]


# =============================================================================== detection (detectron2)
def _det_cfg(setup: Setup, out: str, iters: int, lr: float, seed: int, lrpet: Optional[Tuple[float, int]] = None,
             weights: str = ""):
    from detectron2.config import get_cfg

    from lrpet_dense.configs import config_path
    from lrpet_dense.data.toy_voc import TOY_CLASSES
    from lrpet_dense.detectron2 import add_lrpet_config

    b = setup.budget
    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(config_path("toy/faster_rcnn_lrpet_quickstart.yaml"))
    s = b.det_image_size
    cfg.merge_from_list([
        "DATASETS.TRAIN", ("voc_fidtoy_2007_trainval",), "DATASETS.TEST", ("voc_fidtoy_2007_test",),
        "MODEL.ROI_HEADS.NUM_CLASSES", len(TOY_CLASSES), "MODEL.DEVICE", setup.device, "MODEL.WEIGHTS", weights,
        "INPUT.MIN_SIZE_TRAIN", (s,), "INPUT.MAX_SIZE_TRAIN", s, "INPUT.MIN_SIZE_TEST", s, "INPUT.MAX_SIZE_TEST", s,
        "SOLVER.MAX_ITER", iters, "SOLVER.BASE_LR", lr, "SOLVER.STEPS", (), "SOLVER.CHECKPOINT_PERIOD", 10 ** 9,
        "SOLVER.WARMUP_ITERS", min(20, iters // 4) if not weights else 0, "SEED", seed, "OUTPUT_DIR", out,
        "TEST.PRECISE_BN.NUM_ITER", 4, "LRPET.ENABLED", lrpet is not None,
    ])
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"  # annealed to ~0 at the last step
    if lrpet is not None:
        cfg.LRPET.TARGET_MACS_CUT, cfg.LRPET.INTERVAL = lrpet
    cfg.freeze()
    return cfg


def _det_eval(cfg, model) -> float:
    from lrpet_dense.detectron2.report import evaluate_detector

    return float(evaluate_detector(cfg, model)[0])


def _det_train(cfg):
    from detectron2.utils.env import seed_all_rng

    from lrpet_dense.cli.train_det import Trainer

    seed_all_rng(cfg.SEED)  # what detectron2's default_setup does: the seed decides the run
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def det_job(setup: Setup, job: Job) -> Dict[str, Any]:
    import torch

    from lrpet_dense.core import LRPETConfig
    from lrpet_dense.detectron2 import (build_plan, compress_model_, count_complexity, load_model, pair_convs,
                                        unwrap_model)
    from lrpet_dense.detectron2 import default_plan_hw

    b = setup.budget
    work = os.path.join(setup.out, "runs", job.name)
    os.makedirs(work, exist_ok=True)
    dense_ckpt = _dense_path(setup, "det")
    s = b.det_image_size

    def macs(model):
        return count_complexity(model, (s, s))["backbone"]

    if job.kind == "pretrain":
        cfg = _det_cfg(setup, work, b.det_pretrain, setup.lr_det, job.seed)
        model = unwrap_model(_det_train(cfg).model)
        os.makedirs(os.path.dirname(dense_ckpt), exist_ok=True)
        torch.save({"model": model.state_dict()}, dense_ckpt)
        return {"value": _det_eval(cfg, model), "macs": macs(model), "iters": b.det_pretrain}
    if job.kind == "validate":  # the harness's AP50 == lrpet-dense train-det --eval-only on the same file
        cfg = _det_cfg(setup, work, 1, setup.lr_det, 0)
        model, _ = load_model(cfg, dense_ckpt)
        cfg_file = os.path.join(work, "eval_cfg.yaml")
        with open(cfg_file, "w") as f:
            f.write(cfg.dump())
        env = dict(os.environ, LRPET_FIDTOY_VOC=_det_devkit(setup), OMP_NUM_THREADS=str(setup.threads))
        code = ("import sys; from lrpet_dense.detectron2 import register_toy_voc; "
                "from lrpet_dense.data.toy_voc import TOY_CLASSES; import os; "
                "register_toy_voc(os.environ['LRPET_FIDTOY_VOC'], 'voc_fidtoy_2007', TOY_CLASSES); "
                "from lrpet_dense.cli.train_det import run; run(sys.argv[1:])")
        proc = subprocess.run([sys.executable, "-c", code, "--config", cfg_file, "--eval-only", "MODEL.WEIGHTS",
                               dense_ckpt, "OUTPUT_DIR", os.path.join(work, "tool")], env=env, capture_output=True,
                              text=True, cwd=work)
        import re

        found = re.findall(r"copypaste: [\d.naN]+,([\d.naN]+),[\d.naN]+", proc.stdout + proc.stderr)
        return {"value": _det_eval(cfg, model), "tool_value": float(found[-1]) if found else None,
                "tool_rc": proc.returncode}
    if job.kind == "oneshot":
        cfg = _det_cfg(setup, work, 1, setup.lr_det, 0)
        model, _ = load_model(cfg, dense_ckpt)
        config = LRPETConfig(target_macs_cut=job.cut, energy_transfer=False, bn_rectification=False)
        plan = build_plan(model, pair_convs(model, config).layers, config, default_plan_hw(model, cfg))
        compress_model_(model, plan, project=True, config=config)
        return {"value": _det_eval(cfg, model), "macs": macs(model), "plan_cut": plan.reached_macs_cut}
    lrpet = (job.cut, max(b.det_finetune // b.projections, 1)) if job.method == "lrpet" else None
    cfg = _det_cfg(setup, work, b.det_finetune, setup.lr_det * 0.5, job.seed, lrpet=lrpet, weights=dense_ckpt)
    trainer = _det_train(cfg)
    model = unwrap_model(trainer.model)
    result: Dict[str, Any] = {"iters": b.det_finetune}
    if lrpet is not None:
        hook = next(h for h in trainer._hooks if type(h).__name__ == "LRPETHook")
        compress_model_(model, hook.plan)
        result["plan_cut"] = hook.plan.reached_macs_cut
    result.update(value=_det_eval(cfg, model.eval()), macs=macs(model))
    return result


# =============================================================================== jobs, workers, statistics
def _init_worker(setup: Setup) -> None:
    import torch

    torch.set_num_threads(setup.threads)
    os.environ["OMP_NUM_THREADS"] = str(setup.threads)
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    if os.path.isdir(_det_devkit(setup)):  # the detection set (absent where only segmentation runs)
        from lrpet_dense.data.toy_voc import TOY_CLASSES
        from lrpet_dense.detectron2 import register_toy_voc

        register_toy_voc(_det_devkit(setup), "voc_fidtoy_2007", TOY_CLASSES)
    import lrpet_dense.mmseg  # noqa: F401  (registers the hook and model type)


def _det_devkit(setup: Setup) -> str:
    return os.path.join(setup.out, "toy_det", "VOCdevkit")


def _budget_key(budget: Budget, framework: str) -> Dict[str, Any]:
    """The budget fields a framework's jobs depend on (so that a change for one reruns only its jobs)."""
    shared = ("seeds", "projections")
    mine = {"seg": ("seg_", "cuts", "scratch_cuts", "train_images", "test_images", "image_size", "crop", "batch",
                    "prune_search_steps"), "det": ("det_",)}[framework]
    return {k: v for k, v in asdict(budget).items() if k in shared or k.startswith(mine)}


def run_job(setup: Setup, job: Job) -> Dict[str, Any]:
    """One job, timed; its result also lands in ``OUT/jobs/<job>.json`` (a rerun reuses it)."""
    path = os.path.join(setup.out, "jobs", f"{job.name}.json")
    if os.path.isfile(path) and setup.extra.get("reuse", True):
        with open(path) as f:
            done = json.load(f)
        old = done.get("budget")
        if old is not None and _budget_key(Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in old.items()
                                                      if k in Budget.__dataclass_fields__}), job.framework) == \
                _budget_key(setup.budget, job.framework):  # the same jobs, interrupted: keep what they measured
            return done
    t0, c0 = time.time(), time.process_time()
    out = (seg_job if job.framework == "seg" else det_job)(setup, job)
    out.update(asdict(job), seconds=round(time.time() - t0, 1), cpu_seconds=round(time.process_time() - c0, 1),
               budget=asdict(setup.budget))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"[fidelity] {job.framework} {job.kind} {job.method} cut={job.cut} seed={job.seed}: "
          f"{out.get('value')} in {out['seconds']} s", flush=True)
    return out


def _run_all(setup: Setup, jobs: Sequence[Job], workers: int) -> List[Dict[str, Any]]:
    if workers <= 1:
        _init_worker(setup)
        return [run_job(setup, j) for j in jobs]
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(setup,)) as pool:
        futures = [pool.submit(run_job, setup, j) for j in jobs]
        return [f.result() for f in futures]


def plan_jobs(budget: Budget, frameworks: Sequence[str], methods: Optional[Sequence[str]] = None) -> List[List[Job]]:
    """The jobs in phases: each phase needs the previous one's checkpoints (``methods``: only these rows)."""
    seeds = range(budget.seeds)
    phases: List[List[Job]] = [[], [], []]
    for fw in frameworks:
        phases[0].append(Job(fw, "pretrain"))
        phases[1].append(Job(fw, "validate"))
        cuts = budget.cuts if fw == "seg" else budget.det_cuts
        oneshot = ("svd", "svd-energy") if fw == "seg" else ("svd",)
        phases[1] += [Job(fw, "oneshot", m, c) for c in cuts for m in oneshot]
        phases[2] += [Job(fw, "finetune", "dense-ft", None, s) for s in seeds]
        fts = ("svd-ft", "lrp", "lrp-et", "lrpet", "lrpet-energy", "prune-ft") if fw == "seg" else ("lrpet",)
        phases[2] += [Job(fw, "finetune", m, c, s) for c in cuts for m in fts for s in seeds]
        if fw == "seg":
            phases[2] += [Job(fw, "scratch", "lrpet-scratch", c, s) for c in budget.scratch_cuts for s in seeds]
    if methods:
        phases = [[j for j in p if j.kind in ("pretrain", "validate") or j.method in methods or
                   (j.method == "svd" and "svd-ft" in methods)] for p in phases]
    # longest first, so that two workers end together
    cost = {"scratch": 10, "pretrain": 10, "finetune": 2, "validate": 1, "oneshot": 1}
    return [sorted(p, key=lambda j: -cost[j.kind]) for p in phases]


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(results: Sequence[Dict[str, Any]], budget: Budget) -> Dict[str, Any]:
    """Rows (framework, method, cut): mean, std, n, MACs ratio; validity checks; which differences are real."""
    rows: Dict[Tuple[str, str, Optional[float]], Dict[str, Any]] = {}
    dense = {r["framework"]: r for r in results if r["kind"] == "pretrain"}
    for r in results:
        if r["kind"] in ("pretrain", "validate"):
            continue
        key = (r["framework"], r["method"], r["cut"])
        row = rows.setdefault(key, {"framework": key[0], "method": key[1], "cut": key[2], "values": [], "macs": []})
        row["values"].append(r["value"])
        row["macs"].append(r["macs"]["macs"])
    for fw, d in dense.items():
        rows[(fw, "dense", None)] = {"framework": fw, "method": "dense", "cut": None, "values": [d["value"]],
                                     "macs": [d["macs"]["macs"]]}
    for row in rows.values():
        row["mean"], row["std"] = _mean_std(row["values"])
        row["n"] = len(row["values"])
        base = dense.get(row["framework"])
        row["macs_cut"] = 1 - statistics.fmean(row["macs"]) / base["macs"]["macs"] if base else None
    checks = []
    for fw, d in dense.items():
        v = next((r for r in results if r["framework"] == fw and r["kind"] == "validate"), None)
        if v is not None:
            same = v["tool_value"] is not None and abs(v["tool_value"] - v["value"]) <= 0.01 + 1e-9
            checks.append({"framework": fw, "check": "harness evaluation of the dense checkpoint == the framework's own "
                           "tool", "harness": v["value"], "tool": v["tool_value"], "ok": bool(same)})
        ft = rows.get((fw, "dense-ft", None))
        stds = [r["std"] for r in rows.values() if r["framework"] == fw and r["n"] > 1 and not math.isnan(r["std"])]
        noise = max(stds) if stds else float("nan")
        if ft is not None:
            checks.append({"framework": fw, "check": "dense fine-tuned stays at the dense level (within mean +- 3 std "
                           "of the seeds)", "dense": d["value"], "dense_ft": ft["mean"], "std": ft["std"],
                           "ok": bool(ft["n"] < 2 or abs(ft["mean"] - d["value"]) <= 3 * max(ft["std"], 1e-9))})
        cuts = budget.cuts if fw == "seg" else budget.det_cuts
        for c in cuts:
            svd = rows.get((fw, "svd", c))
            if svd is not None:
                gap = d["value"] - svd["mean"]
                checks.append({"framework": fw, "check": f"task hard enough: dense - svd (no fine-tuning) at a "
                               f"{c:.0%} cut > 3 x the largest seed std", "gap": gap, "largest_std": noise,
                               "ok": bool(not math.isnan(noise) and gap > 3 * noise) if budget.seeds > 1 else None})
    return {"rows": sorted(rows.values(), key=lambda r: (r["framework"], r["cut"] or 0, r["method"])), "checks": checks}


def real_difference(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[bool]:
    """Whether two rows differ beyond the seed noise: their mean +- std intervals do not overlap."""
    if a["n"] < 2 or b["n"] < 2:
        return None
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def render_markdown(data: Dict[str, Any]) -> str:
    s = data["summary"]
    metric = {"seg": "mIoU", "det": "AP50"}
    lines = [f"# Fidelity at equal MACs ({data['mode']} run)", "",
             f"- {data['date']}, {data['cpu']}, {data['threads']} thread(s) x {data['workers']} worker(s), "
             f"device {data['device']}, torch {data['torch']}; {data['wall_minutes']:.1f} min wall for this invocation, "
             f"{data.get('job_minutes', float('nan')):.1f} min summed over its jobs (jobs whose results were already "
             f"in OUT/jobs are reused and counted with their original time)",
             f"- command: `{data['command']}`",
             f"- task: {data['task']}",
             f"- budget: {json.dumps(data['budget'])}",
             "- mean +- std over seeds (n); one-shot rows are deterministic (one value); `real?` compares a row "
             "with the `lrpet` row at the same cut: yes when their mean +- std intervals do not overlap", ""]
    for fw in ("seg", "det"):
        rows = [r for r in s["rows"] if r["framework"] == fw]
        if not rows:
            continue
        lines += [f"## {'Segmentation: PSPNet R50-D8 (mmseg)' if fw == 'seg' else 'Detection: Faster R-CNN R50-C4 (detectron2)'}",
                  "", f"| cut | method | {metric[fw]} | n | backbone MACs cut (counted) | vs lrpet | real? |",
                  "|---:|---|---:|---:|---:|---:|---|"]
        for r in rows:
            ref = next((x for x in rows if x["method"] == "lrpet" and x["cut"] == r["cut"]), None)
            delta = "" if ref is None or r is ref else f"{r['mean'] - ref['mean']:+.2f}"
            real = "" if ref is None or r is ref else {True: "yes", False: "no", None: "-"}[real_difference(r, ref)]
            cut = "-" if r["cut"] is None else f"{r['cut']:.0%}"
            std = f" +- {r['std']:.2f}" if r["n"] > 1 else ""
            lines.append(f"| {cut} | {r['method']} | {r['mean']:.2f}{std} | {r['n']} | "
                         f"{(r['macs_cut'] or 0):.1%} | {delta} | {real} |")
        lines.append("")
    lines += ["## Validity checks", ""]
    for c in s["checks"]:
        mark = {True: "ok", False: "FAILED", None: "n/a (one seed)"}[c["ok"]]
        detail = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                           if k not in ("framework", "check", "ok"))
        lines.append(f"- {c['framework']}: {c['check']}: **{mark}** ({detail})")
    return "\n".join(lines) + "\n"


def plot(data: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["summary"]["rows"]
    fws = [fw for fw in ("seg", "det") if any(r["framework"] == fw for r in rows)]
    fig, axes = plt.subplots(1, len(fws), figsize=(6.5 * len(fws), 4.5), squeeze=False)
    for ax, fw in zip(axes[0], fws):
        for method in dict.fromkeys(r["method"] for r in rows if r["framework"] == fw):
            pts = sorted((r["macs_cut"] or 0, r["mean"], r["std"] if r["n"] > 1 else 0) for r in rows
                         if r["framework"] == fw and r["method"] == method)
            xs, ys, es = zip(*pts)
            ax.errorbar([100 * x for x in xs], ys, yerr=es, marker="o", capsize=3, label=method,
                        linestyle="-" if len(xs) > 1 else "none")
        ax.set_xlabel("backbone MACs removed (%), framework counter")
        ax.set_ylabel("mIoU" if fw == "seg" else "AP50")
        ax.set_title("PSPNet R50-D8 (mmseg)" if fw == "seg" else "Faster R-CNN R50-C4 (detectron2)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"accuracy vs MACs at a fixed fine-tuning budget ({data['mode']}; {data['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one seed, the 50%% cut, shorter training (8 min on 2 cores)")
    mode.add_argument("--tiny", action="store_true", help="a few iterations on a handful of images (the tests)")
    p.add_argument("--out", default=None, help="output folder (default output/fidelity/<mode>)")
    p.add_argument("--results", action="store_true", help="also copy fidelity.{json,md,png} to benchmarks/results/")
    p.add_argument("--frameworks", nargs="+", default=["seg", "det"], choices=["seg", "det"])
    p.add_argument("--methods", nargs="+", default=None, choices=SEG_METHODS, help="only these rows (and dense)")
    p.add_argument("--workers", type=int, default=2, help="job processes (one torch thread each by default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--voc-root", default=None, help="a folder holding VOCdevkit (real VOC2007/VOC2012) instead of "
                   "the generated proxy; with a GPU, scale the budget with --seg-pretrain etc.")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--seg-pretrain", type=int, default=None)
    p.add_argument("--seg-finetune", type=int, default=None)
    p.add_argument("--det-pretrain", type=int, default=None)
    p.add_argument("--det-finetune", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="rerun jobs whose results are already in OUT/jobs")
    args = p.parse_args(argv)

    budget = TINY if args.tiny else QUICK if args.quick else FULL
    changes = {k: getattr(args, k) for k in ("seeds", "seg_pretrain", "seg_finetune", "det_pretrain", "det_finetune")
               if getattr(args, k) is not None}
    budget = replace(budget, **changes)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    args.out = args.out or os.path.join(ROOT, "output", "fidelity", mode)
    os.makedirs(args.out, exist_ok=True)
    if args.fresh and os.path.isdir(os.path.join(args.out, "jobs")):
        shutil.rmtree(os.path.join(args.out, "jobs"))
    if args.voc_root:
        data_root, task = args.voc_root, f"real VOC under {args.voc_root}"
    else:
        from lrpet_dense.data.proxy_voc import PROXY_CLASSES, make_proxy_voc
        from lrpet_dense.data.toy_voc import make_toy_voc

        data_root = os.path.join(args.out, "proxy")
        make_proxy_voc(data_root, budget.train_images, budget.test_images, budget.image_size)
        make_toy_voc(os.path.join(args.out, "toy_det"), budget.det_train_images, budget.det_test_images,
                     budget.det_image_size, max_objects=2, object_size=(0.3, 0.6), noise=6)
        task = (f"segmentation: generated proxy (lrpet_dense.data.proxy_voc): {len(PROXY_CLASSES)} shape x texture "
                f"classes, {budget.train_images} train / {budget.test_images} test images of {budget.image_size} px; "
                f"detection: the quickstart's toy set (3 classes, {budget.det_train_images} train / "
                f"{budget.det_test_images} test images of {budget.det_image_size} px)")
    setup = Setup(out=args.out, data_root=data_root, budget=budget, device=args.device, threads=args.threads,
                  voc=bool(args.voc_root), extra={"reuse": True})
    t0 = time.time()
    results: List[Dict[str, Any]] = []
    for phase in plan_jobs(budget, args.frameworks, args.methods):
        results += _run_all(setup, phase, args.workers)
    import torch

    data = {"mode": mode, "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "threads": args.threads,
            "workers": args.workers, "device": args.device, "torch": torch.__version__,
            "command": " ".join(["python", "benchmarks/bench_fidelity.py", *(argv if argv is not None else sys.argv[1:])]),
            "task": task, "budget": asdict(budget), "wall_minutes": (time.time() - t0) / 60,
            "job_minutes": sum(r.get("seconds", 0) for r in results) / 60,
            "cpu_hours": sum(r.get("cpu_seconds", 0) for r in results) / 3600, "results": results}
    data["summary"] = summarise(results, budget)
    paths = {ext: os.path.join(args.out, f"fidelity.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1)
    text = render_markdown(data)
    with open(paths["md"], "w") as f:
        f.write(text)
    plot(data, paths["png"])
    print(text)
    if args.results:
        dest = os.path.join(ROOT, "benchmarks", "results")
        os.makedirs(dest, exist_ok=True)
        for path in paths.values():
            shutil.copy(path, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
