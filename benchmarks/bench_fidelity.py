#!/usr/bin/env python
"""Fidelity, the paper's way: what LRPET keeps at equal total training, against the alternatives.

The paper's claim (Guo et al., TNNLS 2024; ``docs/method.md``, "Measuring fidelity") is about **equal total
training**: training at full shape while projecting, for the whole run, ends better than decomposing a trained
model and fine-tuning it, at the same number of iterations in all. This benchmark tests that claim on a generated
proxy task (:mod:`lrpet_dense.data.proxy_voc`: shape x texture classes, small overlapping objects, distractors;
real JPEG/XML/PNG files read by the frameworks' own VOC loaders and evaluators), with every model trained by the
frameworks' own runners (mmseg PSPNet R50-D8; detectron2 Faster R-CNN R50-C4). Real training starts from ImageNet
weights; here the segmentation rows (all but ``scratch``) start from a backbone pretrained on a *source* proxy task
(other classes, other images: ``pretrain_iters``), the detection rows from random initialisation.

**1. Converged reference.** The dense model is trained for several budgets (``--seg-iters`` T times
``seg_curve``: 0.5, 0.7, 0.9 and 1; three seeds each; 0.7 and 0.9 are also svd-ft's starting points), every
budget with its own complete schedule (linear warm-up, poly decay to 1e-4). T counts as converged when the last doubling (T/2 -> T) gains less than one
standard error of the T runs and that standard error is at most ``CONVERGED_MAX_SE`` (1 point: the goals' resolution;
a wider seed spread would let any curve pass); the check is printed and fails otherwise.

**2. Equal total training (the headline table).** Every row trains T iterations in all, with the same data,
schedule family, MAC cut (one ratio solved by the core for the cut, counted by the framework's counter) and
evaluator:

================= ==============================================================================================
dense             the reference (T iterations)
lrpet             LRPET for the whole training: the product's hook and defaults (ET + BNR, one ratio solved for
                  the cut), ``projections`` projections (interval T / projections)
lrp, lrp-et       its ablations: no ET and no BNR; ET only
lrpet-energy      LRPET with the energy rank policy
lrpet-ramp        LRPET with ``rank_warmup`` = T/2 (ranks shrink gradually to the plan's; a product option)
scratch           the factorised (thin-conv) model trained from initialisation for T
svd-ft@F          dense for T - F (its own schedule), truncated SVD (rank-k, no ET, no BNR), F iterations
                  factorised (its own schedule from half the learning rate), F = 10% and 30% of T
prune-ft@F        dense for T - F, Torch-Pruning to at most the same backbone MACs (channel pruning), F iterations
                  with the pruning done in ``prune_steps`` steps inside them (Torch-Pruning's iterative mode)
lrpet-early       LRPET for T/2 (its own schedule), factorised, then T/2 ordinary training (as svd-ft's)
================= ==============================================================================================

**3. The same ending for every row.** Every final model, whatever the row, gets its BN statistics recomputed on
``bn_batches`` training batches (:func:`lrpet_dense.core.recalibrate_bn_`, the function the hooks run after the
final projection by default, ``precise_bn_iters``); the table shows the value after it and, beside it, the value
as trained. detectron2 rows end with detectron2's own PreciseBN, which the toy configs run after training.

**4. Compressing a model you already have** (the second scenario): from the dense model (T), F iterations of
``ft-svd`` (decompose, then fine-tune), ``ft-lrpet`` (LRPET projections every F / ``projections_ft``) and
``ft-dense`` (the reference), for F in ``finetune_curve``; one-shot truncation (``svd``, no training) beside them.

**Statistics.** Mean +- std over seeds (n >= 3 for every trained row), and Welch's t-test (two-sided, unequal
variances; ``scipy.stats.ttest_ind``) of each row against the ``lrpet`` row at the same cut. Checks that can fail:
dense converged (above); ``ft-dense`` within two standard errors of dense; the harness's evaluation equals the
framework's own tool (mmseg ``tools/test.py``, ``lrpet-dense train-det --eval-only``) on the dense checkpoint
and on a compressed one; every low-rank row within 0.5 points of its target cut and every pruned row at or
below the target MACs (the framework's counter); a chance row (every pixel background / random boxes).

**Budget.** Jobs run on ``--workers`` processes (one torch thread each) and are cached in ``OUT/jobs/`` (a rerun
reuses finished jobs of the same settings); ``--max-minutes`` stops submitting new jobs after that long, so the
full table can take several invocations. Rows run in the issue's priority order: dense (curve), LRPET, svd-ft,
scratch at 50%, then at 30%; ablations; levers; pruning; early-stopped LRPET; detection; the fine-tune curve.
``--budget-options KEY=VALUE`` sets any other :class:`Budget` field (the proxy's size, classes, learning rate,
...); the source-task pretraining is cached under its own settings only, so a change of the target reuses it.

    python benchmarks/bench_fidelity.py --max-minutes 88         # full run (resumable), then again to finish it
    python benchmarks/bench_fidelity.py --quick                  # one seed, the 50% cut, short budgets
    python benchmarks/bench_fidelity.py --groups curve --budget-options lr=0.02 image_size=64   # a dense curve only
    python benchmarks/bench_fidelity.py --tiny                   # a smoke run (the test suite runs it)
    python benchmarks/bench_fidelity.py --device cuda --voc-root VOC_PARENT --seg-iters 20000 ...   # real VOC, GPU

Results: ``OUT/fidelity.{json,md,png}`` (``--out``, default ``output/fidelity/<mode>``); ``--results`` copies them
to ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from _common import command_line, cpu_name  # benchmarks/_common.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The convergence check's largest standard error of the dense T runs (metric points): with a wider seed spread a
#: doubling's gain is below one standard error whatever the curve does.
CONVERGED_MAX_SE = 1.0
#: Row groups in the issue's priority order (what an interrupted or time-limited run has done first). "curve": the
#: dense learning curve alone (the core groups run it too: their rows start from it or are compared with it).
GROUPS = ("curve", "core50", "core30", "ablations", "levers", "prune", "early", "det", "finetune")
#: method -> (energy transfer, BN rectification, rank policy) of its projections
PROJECTION = {"svd": (False, False, "uniform"), "lrp": (False, False, "uniform"), "lrp-et": (True, False, "uniform"),
              "lrpet": (True, True, "uniform"), "lrpet-energy": (True, True, "energy"),
              "lrpet-ramp": (True, True, "uniform"), "lrpet-p5": (True, True, "uniform"),
              "lrpet-half": (True, True, "uniform")}
LRPET_METHODS = ("lrpet", "lrp", "lrp-et", "lrpet-energy", "lrpet-ramp", "lrpet-p5", "lrpet-half")
#: LRPET rows with fewer projections than ``projections`` over the training (the interval lever)
FEW_PROJECTIONS = {"lrpet-p5": 5}


@dataclass(frozen=True)
class Budget:
    """Iterations, sizes and rows of one benchmark mode (T = ``seg_iters`` / ``det_iters``)."""

    seg_iters: int = 300
    seg_curve: Tuple[float, ...] = (0.5, 0.7, 0.9)   # dense budgets besides T: T/2 (convergence), T - F (svd-ft)
    det_iters: int = 300
    det_curve: Tuple[float, ...] = (0.5, 0.9)
    projections: int = 20           # LRPET projections over a whole training (interval = T // projections)
    seeds: int = 3
    cuts: Tuple[float, ...] = (0.5, 0.3)
    det_cuts: Tuple[float, ...] = (0.5,)
    svd_ft: Tuple[float, ...] = (0.1, 0.3)   # F / T of dense -> SVD -> fine-tune
    prune_ft: float = 0.1           # F / T of dense -> pruning -> fine-tune
    prune_steps: int = 4            # pruning steps inside the prune fine-tune (Torch-Pruning's iterative_steps)
    early: float = 0.5              # early-stopped LRPET: LRPET for this share of T
    rank_warmup: float = 0.5        # lrpet-ramp: rank_warmup = this share of T
    finetune_curve: Tuple[int, ...] = (30, 60, 150)   # scenario 2: fine-tune iterations from the dense model
    finetune_cuts: Tuple[float, ...] = (0.5,)
    projections_ft: int = 5         # LRPET projections in a scenario-2 fine-tune
    bn_batches: int = 20            # the same ending: BN statistics recomputed on this many training batches
    groups: Tuple[str, ...] = GROUPS
    # the segmentation proxy: a target task, and a source task whose pretraining stands in for ImageNet weights
    pretrain_iters: int = 1000      # the backbone pretrained on the source task (0: every row from random init)
    source_classes: Tuple[str, ...] = ("aeroplane", "bird", "dog", "cat")
    target_classes: Tuple[str, ...] = ("boat", "car", "person", "sheep")
    source_images: int = 160
    source_image_size: int = 96     # the source task's image size, crop and learning rate: the pretraining's own,
    source_crop: int = 64           # so that the target task can change and reuse it (as ImageNet weights serve any
    source_lr: float = 0.01         # target task)
    train_images: int = 160
    test_images: int = 40
    image_size: int = 96
    crop: int = 64
    batch: int = 4
    lr: float = 0.01
    # the detection set (the quickstart's toy set)
    det_train_images: int = 64
    det_test_images: int = 16
    det_image_size: int = 128
    det_lr: float = 0.01


FULL = Budget()
QUICK = Budget(seg_iters=40, seg_curve=(0.5,), det_iters=40, det_curve=(), projections=10, seeds=1, cuts=(0.5,),
               svd_ft=(0.1,), groups=("core50", "det"), bn_batches=8, finetune_curve=(), pretrain_iters=40)
TINY = Budget(seg_iters=4, seg_curve=(0.5,), det_iters=4, det_curve=(0.5,), projections=2, seeds=1, cuts=(0.5,),
              svd_ft=(0.5,), prune_ft=0.5, prune_steps=2, finetune_curve=(2,), projections_ft=1, bn_batches=2,
              pretrain_iters=2, source_images=4, source_image_size=64, source_crop=32,
              train_images=4, test_images=2, image_size=64, crop=32, batch=2, det_train_images=2, det_test_images=2,
              groups=tuple(g for g in GROUPS if g not in ("core30", "ablations")))  # each code path once


def budget_options(items: Sequence[str]) -> Dict[str, Any]:
    """``KEY=VALUE`` strings (``--budget-options``) -> :class:`Budget` field values, read as the field's type (a
    tuple field takes comma-separated values, nothing for an empty tuple)."""
    defaults = {f.name: getattr(FULL, f.name) for f in fields(Budget) if f.name != "groups"}
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"--budget-options takes KEY=VALUE with KEY one of {', '.join(defaults)} (--groups "
                             f"chooses the groups); got {item!r}")
        default = defaults[key]
        kind = (type(default[0]) if default else str) if isinstance(default, tuple) else type(default)
        noun = {int: "integer", float: "number"}.get(kind, "string")
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            what = f"a comma-separated list of {noun}s" if isinstance(default, tuple) else \
                f"{'an' if noun == 'integer' else 'a'} {noun}"
            raise ValueError(f"--budget-options {key}: {text!r} is not {what}") from None
        if any(isinstance(v, (int, float)) and not (math.isfinite(v) and v >= 0) for v in values):
            raise ValueError(f"--budget-options {key}: values must be finite and >= 0, got {text!r}")
        if isinstance(default, tuple):
            out[key] = tuple(values)
        elif len(values) == 1:
            out[key] = values[0]
        else:
            raise ValueError(f"--budget-options {key}: one {noun} expected, got {text!r}")
    return out


@dataclass(frozen=True)
class Job:
    """One training (or evaluation) run. ``iters``: its own iterations; ``start``: the iterations of the model it
    starts from (0 = random initialisation), so a row's total training is ``start + iters``."""

    fw: str                     # "seg" | "det"
    method: str
    cut: Optional[float] = None
    seed: int = 0
    iters: int = 0
    start: int = 0
    group: str = field(default="core50", compare=False)  # scheduling priority only: not part of the job's identity
    #: per-layer ratios ``((fnmatch pattern, ratio), ...)`` of an LRPET row's plan in place of the ratio solved for
    #: ``cut`` (a searched plan; ``cut`` stays the cut it was searched under); part of the job's identity
    overrides: Tuple[Tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        bad = [o for o in self.overrides if not (isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str)
                                                 and isinstance(o[1], float) and 0 <= o[1] < 1)]
        if not isinstance(self.overrides, tuple) or bad:
            raise ValueError("Job.overrides must be a tuple of (pattern, ratio in [0, 1)) pairs, got "
                             f"{self.overrides!r}")
        if self.overrides and not (self.fw == "seg" and self.method in LRPET_METHODS):
            raise ValueError(f"Job.overrides are the plan of a segmentation LRPET row ({', '.join(LRPET_METHODS)}); "
                             f"got fw {self.fw!r}, method {self.method!r}")

    @property
    def name(self) -> str:
        cut = "dense" if self.cut is None else f"{self.cut:g}"
        name = f"{self.fw}_{self.method}_{cut}_s{self.seed}_{self.start}+{self.iters}"
        if self.overrides:  # a short stable digest of the plan's ratios (the name is a file name)
            name += "_o" + hashlib.sha1(json.dumps(self.overrides).encode()).hexdigest()[:10]
        return name

    def deps(self, b: "Budget") -> List["Job"]:
        """The jobs whose checkpoints this one starts from."""
        T = budget_iters(b, self.fw)
        if (self.fw == "seg" and b.pretrain_iters and self.start == 0 and self.iters > 0
                and (self.method == "dense" or self.method in LRPET_METHODS)):
            return [Job("seg", "pretrain", None, 0, b.pretrain_iters, 0, self.group)]
        if self.method in ("svd-ft", "prune-ft", "svd"):
            return [Job(self.fw, "dense", None, self.seed, self.start, 0, self.group)]
        if self.method.startswith("ft-"):
            return [Job(self.fw, "dense", None, self.seed, T, 0, self.group)]
        if self.method == "lrpet-early":
            return [Job(self.fw, "lrpet-half", self.cut, self.seed, self.start, 0, self.group)]
        if self.method == "validate":
            return [Job(self.fw, "dense", None, 0, T, 0, self.group), Job(self.fw, "lrpet", self.cut, 0, T, 0, self.group)]
        return []


def budget_iters(b: Budget, fw: str) -> int:
    return b.seg_iters if fw == "seg" else b.det_iters


def share_of(T: int, share: float) -> int:
    return max(1, int(round(T * share)))


@dataclass
class Setup:
    """What every job needs to know (picklable)."""

    out: str
    data_root: str              # folder holding VOCdevkit (segmentation)
    source_root: str            # the source task's VOCdevkit parent (the backbone's pretraining)
    det_root: str               # folder holding VOCdevkit (detection)
    budget: Budget
    device: str = "cpu"
    threads: int = 1
    voc: bool = False
    reuse: bool = True

    def ckpt(self, job: Job, tag: str = "") -> str:
        return os.path.join(self.out, "checkpoints", f"{job.name}{tag}.pth")


# ======================================================================================== segmentation (mmseg)
def _seg_cfg(setup: Setup, work_dir: str, iters: int, seed: int, *, finetune: bool, pretrained: bool = False,
             source: bool = False):
    """The toy PSPNet config on the proxy: ``iters`` iterations of one complete schedule (from initialisation:
    linear warm-up then poly to 1e-4 from ``lr``; a fine-tune: poly from ``lr / 2``, no warm-up). ``pretrained``:
    the backbone initialised from the source-task pretraining (mmseg's ``pretrained``, as ImageNet weights are);
    ``source``: train on the source task."""
    from mmengine.config import Config

    from lrpet_dense.configs import config_path

    b = setup.budget
    os.environ["LRPET_TOY_VOC_ROOT"] = setup.source_root if source else setup.data_root
    size, crop, base_lr = (b.source_image_size, b.source_crop, b.source_lr) if source else (b.image_size, b.crop, b.lr)
    cfg = Config.fromfile(config_path("toy/pspnet_r50-d8_lrpet_toy.py"))
    cfg.work_dir = work_dir
    cfg.experiment_name = f"{os.path.basename(work_dir)}_{os.getpid()}_{time.time_ns()}"
    cfg.model.data_preprocessor.size = (crop, crop)
    cfg.model.pretrained = _pretrained_path(setup) if pretrained else None
    cfg.train_dataloader.batch_size = b.batch
    pipe = cfg.train_dataloader.dataset.pipeline
    pipe[2] = dict(type="RandomResize", scale=(size, size), ratio_range=(0.75, 1.5), keep_ratio=True)
    pipe[3] = dict(type="RandomCrop", crop_size=(crop, crop), cat_max_ratio=0.75)
    cfg.test_dataloader.dataset.pipeline[1] = dict(type="Resize", scale=(size, size), keep_ratio=True)
    cfg.val_dataloader = cfg.test_dataloader
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=10 ** 9)
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=max(iters // 4, 1), log_metric_by_epoch=False)
    cfg.custom_hooks = []
    cfg.log_level = "WARNING"
    cfg.optim_wrapper.optimizer.lr = base_lr / 2 if finetune else base_lr
    warmup = 0 if finetune else min(20, iters // 4)
    sched = [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=warmup, end=iters, by_epoch=False)]
    if warmup:
        sched.insert(0, dict(type="LinearLR", start_factor=0.1, begin=0, end=warmup, by_epoch=False))
    cfg.param_scheduler = sched
    cfg.randomness = dict(seed=seed)
    cfg.device = setup.device
    return cfg


def _pretrained_path(setup: Setup) -> str:
    return setup.ckpt(Job("seg", "pretrain", None, 0, setup.budget.pretrain_iters))


def _seg_runner(cfg, model=None):
    """``Runner.from_cfg(cfg)``, or the same runner around a model instance.

    The runner initialises the weights of a model it is given (``init_weights``) before it loads ``load_from``:
    a model instance carrying trained weights must come with ``load_from`` holding them (:func:`_seg_load_from`).
    """
    from mmengine.runner import Runner

    if model is None:
        return Runner.from_cfg(cfg)
    keys = ("work_dir", "train_dataloader", "val_dataloader", "test_dataloader", "train_cfg", "val_cfg", "test_cfg",
            "auto_scale_lr", "optim_wrapper", "param_scheduler", "val_evaluator", "test_evaluator", "default_hooks",
            "custom_hooks", "data_preprocessor", "load_from", "resume", "launcher", "env_cfg", "log_processor",
            "log_level", "visualizer", "default_scope", "randomness", "experiment_name")
    kwargs = {k: cfg.get(k) for k in keys if k in cfg}
    return Runner(model=model, cfg=cfg, **kwargs)


def _seg_load_from(cfg, model, path: str) -> None:
    """Save ``model``'s weights to ``path`` and make the runner load them after it initialises the model."""
    import torch

    torch.save({"meta": {}, "state_dict": model.state_dict()}, path)
    cfg.load_from = path


def _seg_forward(model, batch) -> None:
    """A segmentor's training forward on a loader batch (every BN a training step updates sees it)."""
    model(**model.data_preprocessor(batch, True), mode="loss")


def _seg_finish(setup: Setup, cfg, model, loader, job: Job) -> Dict[str, Any]:
    """The same ending for every row: the value as trained, then BN statistics recomputed on ``bn_batches``
    training batches (the core function the hooks run after the final projection), and the value after it."""
    from lrpet_dense.core import recalibrate_bn_
    from lrpet_dense.mmseg.report import evaluate_segmentor

    raw = float(evaluate_segmentor(cfg, model)["mIoU"])
    if loader is None:
        from mmengine.runner import Runner

        loader = Runner.build_dataloader(cfg.train_dataloader, seed=job.seed)
    done = recalibrate_bn_(model, loader, _seg_forward, setup.budget.bn_batches)
    value = float(evaluate_segmentor(cfg, model.eval())["mIoU"])
    return {"value": value, "value_as_trained": raw, "bn_batches": done.num_batches,
            "macs": _seg_macs(model, setup)}


def _seg_macs(model, setup: Setup) -> Dict[str, int]:
    from lrpet_dense.mmseg import count_complexity

    s = setup.budget.image_size
    return count_complexity(copy.deepcopy(model).cpu(), (s, s))["backbone"]


def _seg_plan(model, cut: float, method: str):
    import lrpet_dense.mmseg as lm
    from lrpet_dense.core import LRPETConfig

    et, bnr, policy = PROJECTION[method]
    config = LRPETConfig(target_macs_cut=cut, energy_transfer=et, bn_rectification=bnr, rank_policy=policy)
    return config, lm.build_plan(model, lm.pair_convs(model, config).layers, config)


def lrpet_hook_options(b: Budget, method: str, cut: Optional[float], iters: int, projections: int,
                       overrides: Tuple[Tuple[str, float], ...] = ()) -> Dict[str, Any]:
    """The ``LRPETHook`` options of an LRPET row: ``projections`` projections over ``iters`` iterations at the
    method's ET / BNR / rank policy, one ratio solved for ``cut`` (or the plan of ``overrides``: a ratio per layer
    pattern); no BN ending of the hook's own (``precise_bn_iters=0``: the ending is the bench's)."""
    et, bnr, policy = PROJECTION[method]
    options: Dict[str, Any] = dict(target_macs_cut=cut, interval=max(iters // projections, 1), energy_transfer=et,
                                   bn_rectification=bnr, rank_policy=policy, precise_bn_iters=0)
    if method == "lrpet-ramp":
        options["rank_warmup"] = share_of(b.seg_iters, b.rank_warmup)
    if overrides:
        options.update(target_macs_cut=None, overrides=dict(overrides))
    return options


def _seg_dense_model(setup: Setup, job: Job):
    import lrpet_dense.mmseg as lm

    cfg = _seg_cfg(setup, os.path.join(setup.out, "runs", job.name), 1, 0, finetune=True)
    model, _ = lm.load_model(cfg, setup.ckpt(job.deps(setup.budget)[0]))
    return model


def seg_job(setup: Setup, job: Job) -> Dict[str, Any]:
    import torch

    import lrpet_dense.mmseg as lm

    b = setup.budget
    work = os.path.join(setup.out, "runs", job.name)
    os.makedirs(work, exist_ok=True)
    os.makedirs(os.path.join(setup.out, "checkpoints"), exist_ok=True)
    result: Dict[str, Any] = {}
    if job.method == "validate":
        return _seg_validate(setup, job, work)

    if job.method == "svd":  # one-shot truncated SVD of the dense model, no training
        cfg = _seg_cfg(setup, work, 1, job.seed, finetune=True)
        model = _seg_dense_model(setup, job)
        config, plan = _seg_plan(model, job.cut, "svd")
        lm.compress_model_(model, plan, project=True, config=config)
        return dict(_seg_finish(setup, cfg, model, None, job), plan_cut=plan.reached_macs_cut)

    if job.method == "pretrain":  # the source task: the backbone that stands in for ImageNet weights
        cfg = _seg_cfg(setup, work, job.iters, job.seed, finetune=False, source=True)
        runner = _seg_runner(cfg)
        runner.train()
        model = lm.unwrap_model(runner.model)
        torch.save({"state_dict": {k[len("backbone."):]: v for k, v in model.state_dict().items()
                                   if k.startswith("backbone.")}}, setup.ckpt(job))
        from lrpet_dense.mmseg.report import evaluate_segmentor

        return {"value": float(evaluate_segmentor(cfg, model)["mIoU"]), "iters": job.iters, "macs": {"macs": 0}}

    finetune = job.start > 0
    from_pretrained = bool(b.pretrain_iters) and not finetune and job.method != "scratch"
    cfg = _seg_cfg(setup, work, job.iters, job.seed, finetune=finetune, pretrained=from_pretrained)
    model = None
    hook_job = job.method in LRPET_METHODS or job.method == "ft-lrpet"
    if hook_job:
        method = "lrpet" if job.method == "ft-lrpet" else job.method
        projections = b.projections_ft if job.method == "ft-lrpet" else FEW_PROJECTIONS.get(method, b.projections)
        cfg.custom_hooks = [dict(type="LRPETHook", **lrpet_hook_options(b, method, job.cut, job.iters, projections,
                                                                        job.overrides))]
        if job.method == "ft-lrpet":
            cfg.load_from = setup.ckpt(job.deps(b)[0])
    elif job.method == "ft-dense":
        cfg.load_from = setup.ckpt(job.deps(b)[0])
    elif job.method in ("svd-ft", "ft-svd"):  # decompose the dense model, then train the factorised one
        dense = _seg_dense_model(setup, job)
        config, plan = _seg_plan(dense, job.cut, "svd")
        lm.compress_model_(dense, plan, project=True, config=config)
        path = setup.ckpt(job, "_decomposed")
        lm.save_compressed(dense, path)
        cfg.model.factorized_from = path  # built factorised, so the optimizer holds the factorised layers
        cfg.load_from = path
        result["plan_cut"] = plan.reached_macs_cut
    elif job.method == "lrpet-early":  # the factorised model of LRPET's first half, trained on ordinarily
        path = setup.ckpt(job.deps(b)[0], "_compressed")
        cfg.model.factorized_from = path
        cfg.load_from = path
    elif job.method == "scratch":  # the thin-conv model from initialisation
        from mmengine.registry import init_default_scope
        from mmseg.registry import MODELS

        from lrpet_dense.core import factorize_

        init_default_scope("mmseg")
        torch.manual_seed(job.seed)
        model = MODELS.build(cfg.model)
        _, plan = _seg_plan(model, job.cut, "lrpet")
        factorize_(model, plan, from_weights=False)  # the runner's init_weights initialises every conv (Kaiming)
        result["plan_cut"] = plan.reached_macs_cut
    elif job.method == "prune-ft":
        return dict(_seg_prune_ft(setup, job, cfg, work), iters=job.iters)
    elif job.method != "dense":
        raise ValueError(f"unknown segmentation method {job.method!r}")

    runner = _seg_runner(cfg, model)
    runner.train()
    model = lm.unwrap_model(runner.model)
    if job.method == "dense":
        torch.save({"meta": {"dataset_meta": getattr(model, "dataset_meta", None)}, "state_dict": model.state_dict()},
                   setup.ckpt(job))
    if hook_job:  # the hook projected after the last step; factorise with its plan (checked against the dense model)
        hook = next(h for h in runner.hooks if type(h).__name__ == "LRPETHook")
        lm.compress_model_(model, hook.plan)
        result["plan_cut"] = hook.plan.reached_macs_cut
        result["projections"] = hook.projector.num_projections
        if job.method == "lrpet-half":
            lm.save_compressed(model, setup.ckpt(job, "_compressed"))
    result.update(_seg_finish(setup, cfg, model, runner.train_dataloader, job))
    if job.method == "lrpet" and job.seed == 0:  # for the harness-vs-tool check on a compressed checkpoint
        lm.save_compressed(model, setup.ckpt(job, "_final"), meta={"dataset_meta": getattr(model, "dataset_meta", None)})
    result["iters"] = job.iters
    return result


def _seg_validate(setup: Setup, job: Job, work: str) -> Dict[str, Any]:
    """The harness's evaluation == mmseg's own ``tools/test.py``, on the dense checkpoint and on a compressed one
    (the LRPET model as the table has it, BN ending included; built by the config's ``LRPETEncoderDecoder``)."""
    import mmseg

    import lrpet_dense.mmseg as lm
    from lrpet_dense.mmseg.report import evaluate_segmentor

    dense_job, lrpet_job = job.deps(setup.budget)
    out = {}
    for what, path in (("dense", setup.ckpt(dense_job)), ("compressed", setup.ckpt(lrpet_job, "_final"))):
        cfg = _seg_cfg(setup, work, 1, 0, finetune=True)
        model, _ = lm.load_model(cfg, path)
        cfg_file = os.path.join(work, f"test_cfg_{what}.py")
        cfg.log_level = "INFO"  # mmseg's test tool prints the metrics at INFO
        cfg.dump(cfg_file)
        tool = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "tools", "test.py")
        env = dict(os.environ, LRPET_TOY_VOC_ROOT=setup.data_root, OMP_NUM_THREADS=str(setup.threads))
        proc = subprocess.run([sys.executable, tool, cfg_file, path, "--work-dir", os.path.join(work, f"tool_{what}")],
                              env=env, capture_output=True, text=True, cwd=work)
        found = re.findall(r"mIoU: ([\d.]+)", proc.stdout + proc.stderr)
        out[what] = {"harness": float(evaluate_segmentor(cfg, model)["mIoU"]),
                     "tool": float(found[-1]) if found else None, "tool_rc": proc.returncode}
    return out


def _seg_prune_ft(setup: Setup, job: Job, cfg, work: str) -> Dict[str, Any]:
    """Dense (T - F) -> Torch-Pruning -> F iterations, the pruning done in ``prune_steps`` equal steps at the
    starts of the first ``prune_steps`` of ``prune_steps + 1`` training segments (Torch-Pruning's iterative mode:
    prune a little, train, prune again), the learning rate continuing one poly schedule over the F iterations.

    Torch-Pruning as its documentation configures ResNets: group L2-magnitude importance, channels rounded to
    multiples of 8, the heads' convs ignored (their input channels follow the backbone's), the ratio per layer
    uniform; the ratio is bisected so that the final backbone has at most the LRPET model's MACs.
    """
    import torch
    import torch_pruning as tp

    import lrpet_dense.mmseg as lm
    from lrpet_dense.core import factorize_

    b = setup.budget
    dense = _seg_dense_model(setup, job)
    _, plan = _seg_plan(dense, job.cut, "lrpet")
    target = _seg_macs(_factorised_copy(dense, plan, factorize_), setup)["macs"]
    s = b.image_size
    example = torch.randn(1, 3, s, s)

    def pruner_for(model, ratio: float):
        ignored = [m for n, m in model.named_modules() if n.startswith(("decode_head", "auxiliary_head"))
                   and isinstance(m, torch.nn.Conv2d)]
        return tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                    pruning_ratio=ratio, iterative_steps=b.prune_steps, ignored_layers=ignored,
                                    round_to=8, forward_fn=_all_heads)

    def pruned_macs(ratio: float) -> int:
        model = copy.deepcopy(dense).eval()
        pruner = pruner_for(model, ratio)
        for _ in range(b.prune_steps):
            pruner.step()
        return _seg_macs(model, setup)["macs"]

    lo, hi = 0.0, 0.95
    for _ in range(12):  # the smallest ratio whose final backbone has at most the target MACs
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pruned_macs(mid) <= target else (mid, hi)
    ratio = hi
    model = copy.deepcopy(dense).eval()
    pruner = pruner_for(model, ratio)
    segments = b.prune_steps + 1
    bounds = [round(job.iters * i / segments) for i in range(segments + 1)]
    lr0, eta = b.lr / 2, 1e-4
    runner = None
    for i in range(segments):
        if i < b.prune_steps:
            pruner.step()
        n = bounds[i + 1] - bounds[i]
        if n <= 0:
            continue
        seg_cfg = copy.deepcopy(cfg)
        seg_cfg.work_dir = os.path.join(work, f"segment{i}")
        seg_cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=n, val_interval=10 ** 9)
        # the same poly schedule over the F iterations, continued (exact: see the module docs of mmengine's PolyLR)
        seg_cfg.optim_wrapper.optimizer.lr = eta + (lr0 - eta) * (1 - bounds[i] / job.iters) ** 0.9
        seg_cfg.param_scheduler = [dict(type="PolyLR", eta_min=eta, power=0.9, begin=0, end=job.iters - bounds[i],
                                        by_epoch=False)]
        seg_cfg.randomness = dict(seed=job.seed * 100 + i)
        _seg_load_from(seg_cfg, model, os.path.join(work, f"segment{i}_start.pth"))
        runner = _seg_runner(seg_cfg, model.train())
        runner.train()
        model = lm.unwrap_model(runner.model)
    result = _seg_finish(setup, cfg, model, runner.train_dataloader if runner is not None else None, job)
    result["pruning"] = {"ratio": ratio, "target_macs": target, "steps": b.prune_steps}
    result["plan_cut"] = plan.reached_macs_cut
    return result


def _factorised_copy(model, plan, factorize_):
    model = copy.deepcopy(model)
    factorize_(model, plan, from_weights=False)
    return model


def _all_heads(model, x):
    """A forward through the backbone and both heads (the auxiliary one trains too), for the pruner's graph."""
    feats = model.extract_feat(x)
    outs = [model.decode_head(feats)]
    if getattr(model, "auxiliary_head", None) is not None:
        outs.append(model.auxiliary_head(feats))
    return outs


# ================================================================================== detection (detectron2)
def _det_cfg(setup: Setup, out: str, iters: int, seed: int, *, finetune: bool, lrpet: Optional[Tuple[float, int]] = None,
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
        "MODEL.ROI_HEADS.NUM_CLASSES", len(TOY_CLASSES), "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
        "MODEL.DEVICE", setup.device, "MODEL.WEIGHTS", weights,
        "INPUT.MIN_SIZE_TRAIN", (s,), "INPUT.MAX_SIZE_TRAIN", s, "INPUT.MIN_SIZE_TEST", s, "INPUT.MAX_SIZE_TEST", s,
        "SOLVER.MAX_ITER", iters, "SOLVER.BASE_LR", b.det_lr / 2 if finetune else b.det_lr, "SOLVER.STEPS", (),
        "SOLVER.CHECKPOINT_PERIOD", 10 ** 9, "SOLVER.WARMUP_ITERS", 0 if finetune else min(20, iters // 4),
        "SEED", seed, "OUTPUT_DIR", out, "TEST.PRECISE_BN.ENABLED", True, "TEST.PRECISE_BN.NUM_ITER", b.bn_batches,
        "LRPET.ENABLED", lrpet is not None,
    ])
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"  # annealed to ~0 at the last step
    if lrpet is not None:
        cfg.LRPET.TARGET_MACS_CUT, cfg.LRPET.INTERVAL = lrpet
    cfg.freeze()
    return cfg


def _det_eval(cfg, model) -> float:
    from lrpet_dense.detectron2.report import evaluate_detector

    return float(evaluate_detector(cfg, model.eval())[0])


def _det_train(cfg):
    from detectron2.utils.env import seed_all_rng

    from lrpet_dense.cli.train_det import Trainer

    seed_all_rng(cfg.SEED)  # what detectron2's default_setup does: the seed decides the run
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def _det_macs(setup: Setup, model) -> Dict[str, int]:
    from lrpet_dense.detectron2 import count_complexity

    s = setup.budget.det_image_size
    return count_complexity(model, (s, s))["backbone"]


def _det_svd(setup: Setup, job: Job, work: str):
    """The dense detector of the job's parent, truncated (rank-k, no ET/BNR) and factorised; with its plan."""
    from lrpet_dense.core import LRPETConfig
    from lrpet_dense.detectron2 import build_plan, compress_model_, load_model, pair_convs
    from lrpet_dense.detectron2 import default_plan_hw

    cfg = _det_cfg(setup, work, 1, 0, finetune=True)
    model, _ = load_model(cfg, setup.ckpt(job.deps(setup.budget)[0]))
    config = LRPETConfig(target_macs_cut=job.cut, energy_transfer=False, bn_rectification=False)
    plan = build_plan(model, pair_convs(model, config).layers, config, default_plan_hw(model, cfg))
    compress_model_(model, plan, project=True, config=config)
    return cfg, model, plan


def det_job(setup: Setup, job: Job) -> Dict[str, Any]:
    import torch

    from lrpet_dense.detectron2 import compress_model_, save_compressed, unwrap_model

    b = setup.budget
    work = os.path.join(setup.out, "runs", job.name)
    os.makedirs(work, exist_ok=True)
    os.makedirs(os.path.join(setup.out, "checkpoints"), exist_ok=True)
    if job.method == "validate":
        return _det_validate(setup, job, work)
    if job.method == "svd":
        cfg, model, plan = _det_svd(setup, job, work)
        return {"value": _det_eval(cfg, model), "macs": _det_macs(setup, model), "plan_cut": plan.reached_macs_cut}
    result: Dict[str, Any] = {"iters": job.iters}
    weights = ""
    if job.method == "svd-ft":
        _, model, plan = _det_svd(setup, job, work)
        weights = setup.ckpt(job, "_decomposed")
        save_compressed(model, weights)  # built factorised before the optimizer by the trainer (MODEL.WEIGHTS)
        result["plan_cut"] = plan.reached_macs_cut
    elif job.method == "scratch":
        weights = setup.ckpt(job, "_init")
        result["plan_cut"] = _det_scratch_weights(setup, job, work, weights)
    elif job.method not in ("dense", "lrpet"):
        raise ValueError(f"unknown detection method {job.method!r}")
    lrpet = (job.cut, max(job.iters // b.projections, 1)) if job.method == "lrpet" else None
    cfg = _det_cfg(setup, work, job.iters, job.seed, finetune=job.start > 0, lrpet=lrpet, weights=weights)
    trainer = _det_train(cfg)
    model = unwrap_model(trainer.model)
    if job.method == "dense":
        torch.save({"model": model.state_dict()}, setup.ckpt(job))
    if lrpet is not None:  # the hook projected after the last step (before PreciseBN); factorise with its plan
        hook = next(h for h in trainer._hooks if type(h).__name__ == "LRPETHook")
        compress_model_(model, hook.plan)
        result["plan_cut"] = hook.plan.reached_macs_cut
        result["projections"] = hook.projector.num_projections
        if job.seed == 0:
            save_compressed(model, setup.ckpt(job, "_final"))
    result.update(value=_det_eval(cfg, model), macs=_det_macs(setup, model))
    return result


def _det_scratch_weights(setup: Setup, job: Job, work: str, path: str) -> float:
    """A compressed checkpoint of the factorised detector at initialisation (detectron2's init for the dense
    layers, Kaiming for the thin convs, as detectron2's ResNet initialises its convs): MODEL.WEIGHTS of the
    ``scratch`` row, which the trainer builds factorised before its optimizer. Returns the plan's MAC cut."""
    import torch
    from detectron2.modeling import build_model

    from lrpet_dense.core import FactorizedConv2d, LRPETConfig, factorize_
    from lrpet_dense.detectron2 import build_plan, pair_convs, save_compressed
    from lrpet_dense.detectron2 import default_plan_hw

    cfg = _det_cfg(setup, work, 1, job.seed, finetune=False)
    torch.manual_seed(job.seed)
    model = build_model(cfg)
    config = LRPETConfig(target_macs_cut=job.cut)
    plan = build_plan(model, pair_convs(model, config).layers, config, default_plan_hw(model, cfg))
    factorize_(model, plan, from_weights=False)
    for m in model.modules():
        if isinstance(m, FactorizedConv2d):
            for conv in (m.conv_a, m.conv_b):
                torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    save_compressed(model, path)
    return plan.reached_macs_cut


def _det_validate(setup: Setup, job: Job, work: str) -> Dict[str, Any]:
    """The harness's AP50 == ``lrpet-dense train-det --eval-only`` on the dense and on a compressed checkpoint."""
    from lrpet_dense.detectron2 import load_model

    dense_job, lrpet_job = job.deps(setup.budget)
    out = {}
    for what, path in (("dense", setup.ckpt(dense_job)), ("compressed", setup.ckpt(lrpet_job, "_final"))):
        cfg = _det_cfg(setup, work, 1, 0, finetune=True)
        model, _ = load_model(cfg, path)
        cfg_file = os.path.join(work, "eval_cfg.yaml")
        with open(cfg_file, "w") as f:
            f.write(cfg.dump())
        env = dict(os.environ, LRPET_FIDTOY_VOC=os.path.join(setup.det_root, "VOCdevkit"),
                   OMP_NUM_THREADS=str(setup.threads))
        code = ("import sys, os; from lrpet_dense.detectron2 import register_toy_voc; "
                "from lrpet_dense.data.toy_voc import TOY_CLASSES; "
                "register_toy_voc(os.environ['LRPET_FIDTOY_VOC'], 'voc_fidtoy_2007', TOY_CLASSES); "
                "from lrpet_dense.cli.train_det import run; run(sys.argv[1:])")
        proc = subprocess.run([sys.executable, "-c", code, "--config", cfg_file, "--eval-only", "MODEL.WEIGHTS",
                               path, "OUTPUT_DIR", os.path.join(work, f"tool_{what}")], env=env, capture_output=True,
                              text=True, cwd=work)
        found = re.findall(r"copypaste: [\d.naN]+,([\d.naN]+),[\d.naN]+", proc.stdout + proc.stderr)
        out[what] = {"harness": _det_eval(cfg, model), "tool": float(found[-1]) if found else None,
                     "tool_rc": proc.returncode}
    return out


# ======================================================================================= jobs and workers
def add_jobs(b: Budget, jobs: List[Job], *new: Job) -> List[Job]:
    """Append ``new`` to ``jobs`` (in place; returned), each after its dependencies, none twice."""
    for j in new:
        add_jobs(b, jobs, *(replace(d, group=j.group) for d in j.deps(b)))  # what it starts from, first
        if j not in jobs:
            jobs.append(j)
    return jobs


def plan_jobs(b: Budget, frameworks: Sequence[str]) -> List[Job]:
    """Every job of the mode, in priority order (a job's dependencies come before it)."""
    jobs: List[Job] = []

    def add(*new: Job) -> None:
        add_jobs(b, jobs, *new)

    seeds = range(b.seeds)
    T = b.seg_iters
    if "seg" in frameworks:
        if {"curve", "core50", "core30"} & set(b.groups):
            add(*(Job("seg", "dense", None, s, n, 0, "curve") for n in [share_of(T, f) for f in b.seg_curve] + [T]
                  for s in seeds))
        for cut in b.cuts:
            group = "core50" if cut == max(b.cuts) else "core30"
            if group not in b.groups:
                continue
            starts = sorted({T - share_of(T, f) for f in b.svd_ft})
            add(*(Job("seg", "lrpet", cut, s, T, 0, group) for s in seeds))
            add(*(Job("seg", "svd-ft", cut, s, T - n, n, group) for n in starts for s in seeds))
            add(*(Job("seg", "scratch", cut, s, T, 0, group) for s in seeds))
            add(*(Job("seg", "svd", cut, s, 0, T, group) for s in seeds))
            if group == "core50":
                add(Job("seg", "validate", cut, 0, 0, 0, group))
        for group, methods, cuts in (("ablations", ("lrp", "lrp-et", "lrpet-energy"), b.cuts),
                                     ("levers", ("lrpet-ramp", "lrpet-p5"), b.cuts[:1])):
            if group in b.groups:
                add(*(Job("seg", m, cut, s, T, 0, group) for cut in cuts for m in methods for s in seeds))
        if "prune" in b.groups:
            F = share_of(T, b.prune_ft)
            add(*(Job("seg", "dense", None, s, T - F, 0, "prune") for s in seeds))
            add(*(Job("seg", "prune-ft", cut, s, F, T - F, "prune") for cut in b.cuts for s in seeds))
        if "early" in b.groups:
            half = share_of(T, b.early)
            add(*(Job("seg", "lrpet-half", cut, s, half, 0, "early") for cut in b.cuts for s in seeds))
            add(*(Job("seg", "lrpet-early", cut, s, T - half, half, "early") for cut in b.cuts for s in seeds))
    if "det" in frameworks and "det" in b.groups:
        Td = b.det_iters
        F = share_of(Td, min(b.svd_ft))
        add(*(Job("det", "dense", None, s, n, 0, "det") for n in [share_of(Td, f) for f in b.det_curve] + [Td - F, Td]
              for s in seeds))
        for cut in b.det_cuts:
            add(*(Job("det", "lrpet", cut, s, Td, 0, "det") for s in seeds))
            add(*(Job("det", "svd-ft", cut, s, F, Td - F, "det") for s in seeds))
            add(*(Job("det", "scratch", cut, s, Td, 0, "det") for s in seeds))
            add(*(Job("det", "svd", cut, s, 0, Td, "det") for s in seeds))
        add(Job("det", "validate", max(b.det_cuts), 0, 0, 0, "det"))
    if "seg" in frameworks and "finetune" in b.groups:
        for F in b.finetune_curve:
            add(*(Job("seg", "ft-dense", None, s, F, T, "finetune") for s in seeds))
            for cut in b.finetune_cuts:
                add(*(Job("seg", m, cut, s, F, T, "finetune") for m in ("ft-svd", "ft-lrpet") for s in seeds))
    return jobs


def _init_worker(setup: Setup) -> None:
    import torch

    torch.set_num_threads(setup.threads)
    os.environ["OMP_NUM_THREADS"] = str(setup.threads)
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    devkit = os.path.join(setup.det_root, "VOCdevkit")
    if os.path.isdir(devkit):
        from lrpet_dense.data.toy_voc import TOY_CLASSES
        from lrpet_dense.detectron2 import register_toy_voc

        register_toy_voc(devkit, "voc_fidtoy_2007", TOY_CLASSES)
    import lrpet_dense.mmseg  # noqa: F401  (registers the hook and model type)


#: the settings the source-task pretraining depends on (every segmentation row starts from it)
_SOURCE_SETTINGS = ("pretrain_iters", "source_classes", "source_images", "source_image_size", "source_crop",
                    "source_lr", "batch", "test_images")


def _settings_key(b: Budget, job: Job) -> str:
    """The settings ``job`` depends on: a job is reused only when they are unchanged. The source-task pretraining
    depends on the source task's settings only (a change of the target task reuses it)."""
    if job.fw == "det":
        keep: Tuple[str, ...] = ("det_iters", "projections", "bn_batches", "det_train_images", "det_test_images",
                                 "det_image_size", "det_lr")
    elif job.method == "pretrain":
        keep = _SOURCE_SETTINGS
    else:
        keep = _SOURCE_SETTINGS + ("seg_iters", "projections", "rank_warmup", "prune_steps", "projections_ft",
                                   "bn_batches", "target_classes", "train_images", "image_size", "crop", "lr")
    data = {k: getattr(b, k) for k in keep}
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _job_path(setup: Setup, job: Job) -> str:
    return os.path.join(setup.out, "jobs", f"{job.name}_{_settings_key(setup.budget, job)}.json")


def cached_result(setup: Setup, job: Job) -> Optional[Dict[str, Any]]:
    """The result of ``job`` from an earlier run with the same settings (None if there is none, or ``--fresh``)."""
    path = _job_path(setup, job)
    if setup.reuse and os.path.isfile(path):
        try:
            with open(path) as f:
                return json.load(f)
        except ValueError as e:
            raise RuntimeError(f"the cached result {path} is not valid JSON ({e}): delete it to rerun "
                               f"{job.name}") from e
    return None


def run_job(setup: Setup, job: Job) -> Dict[str, Any]:
    """One job, timed; its result also lands in ``OUT/jobs/<job>.json`` (:func:`run_all` reads it there on a rerun
    with the same settings)."""
    path = _job_path(setup, job)
    t0, c0 = time.time(), time.process_time()
    out = (seg_job if job.fw == "seg" else det_job)(setup, job)
    out.update(asdict(job), name=job.name, seconds=round(time.time() - t0, 1),
               cpu_seconds=round(time.process_time() - c0, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:  # complete or absent: a full disk must not leave a truncated cache entry
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    print(f"[fidelity] {job.name}: {out.get('value', '')} in {out['seconds']} s", flush=True)
    return out


def _cost(b: Budget, job: Job) -> float:
    return job.iters + (5 if job.method in ("svd", "validate") else 0)


def run_all(setup: Setup, jobs: Sequence[Job], workers: int, deadline: Optional[float]) -> Dict[Job, Dict[str, Any]]:
    """Run ``jobs`` on ``workers`` processes, each as soon as its dependencies are done, in priority order;
    no new job is started after ``deadline`` (``time.time()``). Returns the finished jobs' results."""
    b = setup.budget
    done: Dict[Job, Dict[str, Any]] = {}
    todo = []
    for j in jobs:  # finished jobs are read whatever the deadline (it limits the jobs that need running)
        cached = cached_result(setup, j)
        if cached is None:
            todo.append(j)
        else:
            done[j] = cached
    if workers <= 1:
        _init_worker(setup)
        for j in todo:
            if deadline is not None and time.time() > deadline:
                break
            done[j] = run_job(setup, j)
        return done
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    running: Dict[Any, Job] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(setup,)) as pool:
        while todo or running:
            ready = [j for j in todo if all(d in done for d in j.deps(b))]
            while ready and len(running) < workers and (deadline is None or time.time() < deadline):
                j = ready.pop(0)
                todo.remove(j)
                running[pool.submit(run_job, setup, j)] = j
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in finished:
                done[running.pop(f)] = f.result()
    return done


# ============================================================================================== statistics
def welch_p(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Two-sided Welch t-test p-value of ``a`` vs ``b`` (None with fewer than 2 values each or no spread)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return None if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _stats(values: Sequence[float]) -> Dict[str, Any]:
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    mean = statistics.fmean(vals) if vals else float("nan")
    std = statistics.stdev(vals) if n > 1 else float("nan")
    return {"values": vals, "n": n, "mean": mean, "std": std, "se": std / math.sqrt(n) if n > 1 else float("nan")}


ROW_LABELS = {
    "dense": "dense", "lrpet": "LRPET, whole training (product defaults)", "lrp": "LRP (no ET, no BNR)",
    "lrp-et": "LRP + ET (no BNR)", "lrpet-energy": "LRPET, energy rank policy", "lrpet-ramp": "LRPET, rank warm-up T/2", "lrpet-p5": "LRPET, 5 projections (interval T/5)",
    "scratch": "factorised model from scratch", "svd-ft": "dense -> truncated SVD -> fine-tune",
    "prune-ft": "dense -> Torch-Pruning -> fine-tune", "lrpet-early": "LRPET for T/2, factorised, trained on",
    "svd": "truncated SVD of dense(T), no training (one-shot)", "ft-dense": "dense fine-tuned", "ft-svd":
    "truncated SVD + fine-tune", "ft-lrpet": "LRPET fine-tune",
}


def summarise(results: Dict[str, Dict[str, Any]], b: Budget, chance: Dict[str, float]) -> Dict[str, Any]:
    """Rows, learning curves, p-values, checks and goals from the finished jobs."""
    res = list(results.values())
    rows: Dict[Tuple, Dict[str, Any]] = {}
    curve: Dict[Tuple[str, int], List[float]] = {}
    for r in res:
        if r["method"] in ("validate", "lrpet-half", "pretrain"):
            continue
        if r["method"] == "dense":
            curve.setdefault((r["fw"], r["iters"]), []).append(r["value"])
            if r["iters"] != budget_iters(b, r["fw"]):
                continue
        scenario = "finetune" if r["method"].startswith("ft-") else "oneshot" if r["method"] == "svd" else "equal"
        F = r["iters"] if r["start"] else None
        key = (r["fw"], scenario, r["method"], r["cut"], F if r["method"] in ("svd-ft", "prune-ft") or
               scenario == "finetune" else None)
        row = rows.setdefault(key, {"fw": key[0], "scenario": key[1], "method": key[2], "cut": key[3], "F": key[4],
                                    "runs": []})
        row["runs"].append(r)
    dense_macs = {fw: statistics.fmean(r["macs"]["macs"] for r in res if r["fw"] == fw and r["method"] == "dense")
                  for fw in ("seg", "det") if any(r["fw"] == fw and r["method"] == "dense" for r in res)}
    out_rows = []
    for key, row in rows.items():
        st = _stats([r["value"] for r in row["runs"]])
        raw = _stats([r.get("value_as_trained", r["value"]) for r in row["runs"]])
        macs = statistics.fmean(r["macs"]["macs"] for r in row["runs"])
        base = dense_macs.get(row["fw"])
        out_rows.append({k: v for k, v in row.items() if k != "runs"} | {
            "label": ROW_LABELS.get(row["method"], row["method"]), **st, "as_trained": raw,
            "iters_total": row["runs"][0]["start"] + row["runs"][0]["iters"],
            "macs_cut": None if not base else 1 - macs / base,
            "pruning": [r["pruning"] for r in row["runs"] if r.get("pruning")],
            "macs_ok": all(r["macs"]["macs"] <= r["pruning"]["target_macs"] for r in row["runs"] if r.get("pruning"))})
    # p-values against the LRPET row of the same framework, scenario and cut (equal scenario: the whole-training row)
    for row in out_rows:
        if row["scenario"] == "finetune":
            ref = next((x for x in out_rows if x["fw"] == row["fw"] and x["method"] == "ft-lrpet" and
                        x["cut"] == row["cut"] and x["F"] == row["F"]), None)
        else:
            ref = next((x for x in out_rows if x["fw"] == row["fw"] and x["method"] == "lrpet" and
                        x["scenario"] == "equal" and x["cut"] == row["cut"]), None)
        if ref is None or ref is row:
            row["vs_lrpet"], row["p"] = None, None
            continue
        row["vs_lrpet"] = row["mean"] - ref["mean"]
        row["p"] = welch_p(row["values"], ref["values"])
    out_rows.sort(key=lambda r: (r["fw"], ("equal", "oneshot", "finetune").index(r["scenario"]), -(r["cut"] or 1),
                                 list(ROW_LABELS).index(r["method"]) if r["method"] in ROW_LABELS else 99, r["F"] or 0))
    curves = {fw: [{"iters": n, **_stats(v)} for (f, n), v in sorted(curve.items()) if f == fw]
              for fw in ("seg", "det")}
    checks = _checks(results, b, out_rows, curves, chance)
    return {"rows": out_rows, "curves": curves, "checks": checks, "goals": _goals(out_rows, chance),
            "chance": chance}


def _checks(results, b: Budget, rows, curves, chance) -> List[Dict[str, Any]]:
    checks: List[Dict[str, Any]] = []
    for fw, pts in curves.items():
        T = budget_iters(b, fw)
        at = {p["iters"]: p for p in pts}
        half = at.get(share_of(T, 0.5))
        if T in at and half is not None:
            gain = at[T]["mean"] - half["mean"]
            se = at[T]["se"]
            checks.append({"fw": fw, "check": f"dense converged: the last doubling ({half['iters']} -> {T} iterations) "
                           f"gains less than one standard error of the T runs, itself at most {CONVERGED_MAX_SE:g} point",
                           "gain": gain, "se": se,
                           "ok": None if math.isnan(se) else bool(gain < se <= CONVERGED_MAX_SE)})
    for r in (x for x in results.values() if x["method"] == "validate"):
        for what in ("dense", "compressed"):
            v = r.get(what)
            if v:
                same = v["tool"] is not None and abs(v["tool"] - v["harness"]) <= 0.01 + 1e-9
                checks.append({"fw": r["fw"], "check": f"harness evaluation == the framework's own tool ({what} "
                               "checkpoint)", "harness": v["harness"], "tool": v["tool"], "ok": bool(same)})
    dense = {x["fw"]: x for x in rows if x["method"] == "dense"}
    for row in rows:
        if row["method"] == "ft-dense" and row["fw"] in dense:
            d = dense[row["fw"]]
            se = math.sqrt(row["se"] ** 2 + d["se"] ** 2) if row["n"] > 1 and d["n"] > 1 else float("nan")
            checks.append({"fw": row["fw"], "check": f"dense fine-tuned {row['F']} iterations stays within 2 standard "
                           "errors of dense", "dense": d["mean"], "dense_ft": row["mean"], "se": se,
                           "ok": None if math.isnan(se) else bool(abs(row["mean"] - d["mean"]) <= 2 * se)})
        if row["cut"] is None or row["macs_cut"] is None:
            continue
        if row["method"] == "prune-ft":
            checks.append({"fw": row["fw"], "check": f"{row['method']} at {row['cut']:.0%}: every run at or below the "
                           "LRPET model's backbone MACs", "macs_cut": row["macs_cut"], "ok": bool(row["macs_ok"])})
        else:
            checks.append({"fw": row["fw"], "check": f"{row['method']} at {row['cut']:.0%}: backbone MACs cut within "
                           "0.5 points of the target", "macs_cut": row["macs_cut"],
                           "ok": bool(abs(row["macs_cut"] - row["cut"]) <= 0.005)})
    return checks


def _goals(rows, chance) -> List[Dict[str, Any]]:
    def get(method, cut, F=None, fw="seg", scenario="equal"):
        return next((r for r in rows if r["fw"] == fw and r["method"] == method and r["cut"] == cut and
                     r["scenario"] == scenario and (F is None or r["F"] == F)), None)

    goals = []
    dense = next((r for r in rows if r["fw"] == "seg" and r["method"] == "dense"), None)
    lrpet30 = get("lrpet", 0.3)
    if dense and lrpet30:
        goals.append({"goal": "LRPET for the whole training within 1 mIoU of dense at a 30% cut",
                      "dense": dense["mean"], "lrpet": lrpet30["mean"], "gap": dense["mean"] - lrpet30["mean"],
                      "p": welch_p(dense["values"], lrpet30["values"]),
                      "met": bool(dense["mean"] - lrpet30["mean"] <= 1.0)})
    lrpet50 = get("lrpet", 0.5)
    for r in rows:
        if r["fw"] == "seg" and r["method"] == "svd-ft" and r["cut"] == 0.5 and lrpet50:
            goals.append({"goal": f"LRPET for the whole training ahead of dense -> SVD -> fine-tune (F = {r['F']}) at "
                          "equal total training at a 50% cut, p < 0.05", "lrpet": lrpet50["mean"], "svd_ft": r["mean"],
                          "p": r["p"], "met": bool(lrpet50["mean"] > r["mean"] and r["p"] is not None and r["p"] < 0.05)})
    prune30 = get("prune-ft", 0.3)
    if dense and prune30 and "seg" in chance:
        floor = chance["seg"]
        goals.append({"goal": "the pruning baseline above the background floor by at least half the dense-to-floor "
                      "gap at a 30% cut", "prune": prune30["mean"], "floor": floor, "dense": dense["mean"],
                      "met": bool(prune30["mean"] - floor >= 0.5 * (dense["mean"] - floor))})
    return goals


# ================================================================================================ output
def _fmt(row) -> str:
    return f"{row['mean']:.2f}" + (f" +- {row['std']:.2f}" if row["n"] > 1 else "")


def _p(p: Optional[float]) -> str:
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def render_markdown(data: Dict[str, Any]) -> str:
    s = data["summary"]
    metric = {"seg": "mIoU", "det": "AP50"}
    lines = [f"# Fidelity, the paper's way ({data['mode']} run)", "",
             f"- {data['date']}, {data['cpu']}, {data['threads']} thread(s) x {data['workers']} worker(s), device "
             f"{data['device']}, torch {data['torch']}; this invocation {data['wall_minutes']:.1f} min wall; the jobs "
             f"summed {data['job_minutes']:.1f} min ({data['cpu_hours']:.2f} CPU hours; reused jobs count with their "
             f"original time); code {data['commit']}",
             f"- command: `{data['command']}`",
             f"- task: {data['task']}",
             f"- budget: {json.dumps(data['budget'])}",
             "- mean +- std over seeds (n); p: two-sided Welch t-test against the `lrpet` row of the same cut (and F); "
             "value after the same ending for every row (BN statistics recomputed on training batches; detectron2: "
             "its PreciseBN), 'as trained' before it", ""]
    if data.get("missing"):
        lines += [f"- **not run in this table** (time limit or rows left out): {', '.join(data['missing'])}", ""]
    for fw in ("seg", "det"):
        pts = s["curves"].get(fw) or []
        if pts:
            lines += [f"## {'PSPNet R50-D8' if fw == 'seg' else 'Faster R-CNN R50-C4'}: dense learning curve", "",
                      f"| iterations | {metric[fw]} | n |", "|---:|---:|---:|"]
            lines += [f"| {p['iters']} | {p['mean']:.2f}" + (f" +- {p['std']:.2f}" if p["n"] > 1 else "") +
                      f" | {p['n']} |" for p in pts]
            lines.append("")
        rows = [r for r in s["rows"] if r["fw"] == fw]
        if not rows:
            continue
        title = "Segmentation: PSPNet R50-D8 (mmseg)" if fw == "seg" else "Detection: Faster R-CNN R50-C4 (detectron2)"
        lines += [f"## {title}: equal total training", "",
                  f"| cut | row | total iters | {metric[fw]} | as trained | n | MACs cut | vs lrpet | p |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        if fw in s["chance"]:
            lines.append(f"| - | chance (every pixel background / random boxes) | 0 | {s['chance'][fw]:.2f} | | | | | |")
        for r in (x for x in rows if x["scenario"] in ("equal", "oneshot")):
            label = r["label"] + (f", F = {r['F']}" if r["F"] else "")
            cut = "-" if r["cut"] is None else f"{r['cut']:.0%}"
            delta = "" if r.get("vs_lrpet") is None else f"{r['vs_lrpet']:+.2f}"
            raw = r["as_trained"]
            lines.append(f"| {cut} | {label} | {r['iters_total']} | {_fmt(r)} | {raw['mean']:.2f} | {r['n']} | "
                         f"{(r['macs_cut'] or 0):.1%} | {delta} | {_p(r.get('p'))} |")
        lines.append("")
        ft = [x for x in rows if x["scenario"] == "finetune"]
        if ft:
            lines += [f"## {title}: compressing a trained dense model (fine-tune F iterations from dense(T))", "",
                      f"| cut | row | F | {metric[fw]} | as trained | n | MACs cut | vs LRPET fine-tune | p |",
                      "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
            for r in ft:
                cut = "-" if r["cut"] is None else f"{r['cut']:.0%}"
                delta = "" if r.get("vs_lrpet") is None else f"{r['vs_lrpet']:+.2f}"
                lines.append(f"| {cut} | {r['label']} | {r['F']} | {_fmt(r)} | {r['as_trained']['mean']:.2f} | "
                             f"{r['n']} | {(r['macs_cut'] or 0):.1%} | {delta} | {_p(r.get('p'))} |")
            lines.append("")
    lines += ["## Validity checks", ""]
    for c in s["checks"]:
        mark = {True: "ok", False: "FAILED", None: "n/a (one seed)"}[c["ok"]]
        detail = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                           if k not in ("fw", "check", "ok"))
        lines.append(f"- {c['fw']}: {c['check']}: **{mark}** ({detail})")
    lines += ["", "## Goals (issue 26; reported either way, the bench is not tuned toward them)", ""]
    for g in s["goals"]:
        detail = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in g.items()
                           if k not in ("goal", "met"))
        lines.append(f"- {g['goal']}: **{'met' if g['met'] else 'not met'}** ({detail})")
    return "\n".join(lines) + "\n"


def plot(data: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["summary"]
    fws = [fw for fw in ("seg", "det") if s["curves"].get(fw) or any(r["fw"] == fw for r in s["rows"])]
    if not fws:
        return
    fig, axes = plt.subplots(len(fws), 3, figsize=(17, 4.6 * len(fws)), squeeze=False)
    for ax_row, fw in zip(axes, fws):
        metric = "mIoU" if fw == "seg" else "AP50"
        pts = s["curves"].get(fw) or []
        ax = ax_row[0]
        if pts:
            ax.errorbar([p["iters"] for p in pts], [p["mean"] for p in pts],
                        yerr=[0 if math.isnan(p["std"]) else p["std"] for p in pts], marker="o", capsize=3)
        ax.set_xlabel("training iterations (each budget its own schedule)")
        ax.set_ylabel(metric)
        ax.set_title(f"dense learning curve ({fw})")
        ax.grid(alpha=0.3)
        ax = ax_row[1]
        rows = [r for r in s["rows"] if r["fw"] == fw and r["scenario"] in ("equal", "oneshot") and r["cut"]]
        cuts = sorted({r["cut"] for r in rows}, reverse=True)
        labels = list(dict.fromkeys(r["label"] + (f" F={r['F']}" if r["F"] else "") for r in rows))
        width = 0.8 / max(len(cuts), 1)
        for i, cut in enumerate(cuts):
            vals = []
            for lab in labels:
                r = next((x for x in rows if x["cut"] == cut and x["label"] + (f" F={x['F']}" if x["F"] else "") == lab),
                         None)
                vals.append((r["mean"], 0 if r is None or math.isnan(r["std"]) else r["std"]) if r else (0, 0))
            ax.barh([j + i * width for j in range(len(labels))], [v[0] for v in vals], height=width,
                    xerr=[v[1] for v in vals], label=f"{cut:.0%} cut", capsize=2)
        dense = next((r for r in s["rows"] if r["fw"] == fw and r["method"] == "dense"), None)
        if dense:
            ax.axvline(dense["mean"], color="k", linestyle="--", linewidth=1, label="dense")
        if fw in s["chance"]:
            ax.axvline(s["chance"][fw], color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_yticks([j + width * (len(cuts) - 1) / 2 for j in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel(metric)
        ax.set_title("equal total training")
        ax.legend(fontsize=7)
        ax = ax_row[2]
        ft = [r for r in s["rows"] if r["fw"] == fw and r["scenario"] == "finetune"]
        for method in dict.fromkeys(r["method"] for r in ft):
            for cut in sorted({r["cut"] for r in ft if r["method"] == method}, key=lambda c: c or 0):
                pts2 = sorted((r["F"], r["mean"], 0 if math.isnan(r["std"]) else r["std"]) for r in ft
                              if r["method"] == method and r["cut"] == cut)
                xs, ys, es = zip(*pts2)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3,
                            label=ROW_LABELS[method] + ("" if cut is None else f" ({cut:.0%})"))
        ax.set_xlabel("fine-tuning iterations F from dense(T)")
        ax.set_ylabel(metric)
        ax.set_title("compressing a trained model")
        ax.grid(alpha=0.3)
        if ft:
            ax.legend(fontsize=7)
        else:  # a partial table (time limit or --groups): say so rather than draw empty axes
            ax.text(0.5, 0.5, "not run in this table", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"fidelity ({data['mode']}; {data['cpu']}; {data['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _chance(setup: Setup, frameworks: Sequence[str]) -> Dict[str, float]:
    out = {}
    if "seg" in frameworks:
        from lrpet_dense.mmseg.report import chance_segmentor

        _init_worker(setup)
        out["seg"] = float(chance_segmentor(_seg_cfg(setup, os.path.join(setup.out, "runs", "chance"), 1, 0,
                                                     finetune=True))["mIoU"])
    if "det" in frameworks and "det" in setup.budget.groups:
        from lrpet_dense.detectron2.report import chance_detector

        _init_worker(setup)
        out["det"] = float(chance_detector(_det_cfg(setup, os.path.join(setup.out, "runs", "chance"), 1, 0,
                                                    finetune=True))[0])
    return out


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout
        return sha.strip() + ("+changes" if dirty.strip() else "")
    except OSError:
        return "unknown"


def make_setup(budget: Budget, out: str, frameworks: Sequence[str] = ("seg", "det"), *, voc_root: Optional[str] = None,
               device: str = "cpu", threads: int = 1, reuse: bool = True) -> Tuple[Setup, str]:
    """The datasets of ``budget`` under ``out`` (the generated proxy and its source task, the detection toy set
    when ``frameworks`` has ``det``; written every time, deterministically) and the :class:`Setup` of its jobs,
    with the task's description. ``voc_root``: a folder holding VOCdevkit (real VOC) in place of the proxy."""
    from lrpet_dense.data.proxy_voc import make_proxy_voc
    from lrpet_dense.data.toy_voc import make_toy_voc

    os.makedirs(out, exist_ok=True)
    det_root = os.path.join(out, "toy_det")
    source_root = os.path.join(out, "source")
    if voc_root:
        data_root, task = voc_root, f"real VOC under {voc_root}"
    else:
        data_root = os.path.join(out, "proxy")
        make_proxy_voc(data_root, budget.train_images, budget.test_images, budget.image_size,
                       classes=budget.target_classes)
        task = (f"segmentation: generated proxy (lrpet_dense.data.proxy_voc) with the shape x texture classes "
                f"{', '.join(budget.target_classes)}: {budget.train_images} train / {budget.test_images} test images of "
                f"{budget.image_size} px, {budget.crop} px crops, batch {budget.batch}")
        if budget.pretrain_iters:
            make_proxy_voc(source_root, budget.source_images, budget.test_images, budget.source_image_size, seed=1,
                           classes=budget.source_classes)
            task += (f"; every row but 'scratch' starts from a backbone pretrained for {budget.pretrain_iters} "
                     f"iterations on a source task (the stand-in for ImageNet weights: the classes "
                     f"{', '.join(budget.source_classes)}, other images, {budget.source_images} train images of "
                     f"{budget.source_image_size} px, {budget.source_crop} px crops, learning rate {budget.source_lr:g})")
    if "det" in frameworks and "det" in budget.groups:
        make_toy_voc(det_root, budget.det_train_images, budget.det_test_images, budget.det_image_size,
                     max_objects=2, object_size=(0.3, 0.6), noise=6)
        task += (f"; detection: the quickstart's toy set (3 classes, {budget.det_train_images} train / "
                 f"{budget.det_test_images} test images of {budget.det_image_size} px)")
    setup = Setup(out=out, data_root=data_root, source_root=source_root, det_root=det_root, budget=budget,
                  device=device, threads=threads, voc=bool(voc_root), reuse=reuse)
    return setup, task


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one seed, the 50%% cut, short budgets (minutes)")
    mode.add_argument("--tiny", action="store_true", help="a few iterations on a handful of images (the tests)")
    p.add_argument("--out", default=None, help="output folder (default output/fidelity/<mode>)")
    p.add_argument("--results", action="store_true", help="also copy fidelity.{json,md,png} to benchmarks/results/")
    p.add_argument("--frameworks", nargs="+", default=["seg", "det"], choices=["seg", "det"])
    p.add_argument("--groups", nargs="+", default=None, choices=GROUPS, help="only these row groups")
    p.add_argument("--workers", type=int, default=2, help="job processes (one torch thread each by default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new job after this long (resumable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--voc-root", default=None, help="a folder holding VOCdevkit (real VOC2012 aug segmentation) instead "
                   "of the generated proxy; scale --seg-iters to it")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--seg-iters", type=int, default=None, help="T of the segmentation rows")
    p.add_argument("--det-iters", type=int, default=None, help="T of the detection rows")
    p.add_argument("--pretrain-iters", type=int, default=None, help="source-task pretraining of the segmentation "
                   "backbone (0: every row from random initialisation; with --voc-root use real pretrained weights)")
    p.add_argument("--budget-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="other settings of the mode's Budget (e.g. image_size=64 crop=48 lr=0.02 "
                   "target_classes=car,person seg_curve=0.5); the flags above take precedence")
    p.add_argument("--fresh", action="store_true", help="rerun jobs whose results are already in OUT/jobs")
    args = p.parse_args(argv)

    budget = TINY if args.tiny else QUICK if args.quick else FULL
    try:
        budget = replace(budget, **budget_options(args.budget_options))
    except ValueError as e:
        p.error(str(e))
    changes = {k: getattr(args, k) for k in ("seeds", "seg_iters", "det_iters", "pretrain_iters")
               if getattr(args, k) is not None}
    if args.groups:
        changes["groups"] = tuple(args.groups)
    budget = replace(budget, **changes)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    args.out = os.path.abspath(args.out or os.path.join(ROOT, "output", "fidelity", mode))
    setup, task = make_setup(budget, args.out, args.frameworks, voc_root=args.voc_root, device=args.device,
                             threads=args.threads, reuse=not args.fresh)
    t0 = time.time()
    jobs = plan_jobs(budget, args.frameworks)
    deadline = None if args.max_minutes is None else t0 + 60 * args.max_minutes
    done = run_all(setup, jobs, args.workers, deadline)
    chance = _chance(setup, args.frameworks)
    import torch

    results = {j.name: r for j, r in done.items()}
    missing = [j.name for j in jobs if j not in done]
    data = {"mode": mode, "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "threads": args.threads,
            "workers": args.workers, "device": args.device, "torch": torch.__version__, "commit": _commit(),
            "command": command_line("bench_fidelity.py", argv if argv is not None else sys.argv[1:]),
            "task": task, "budget": asdict(budget), "wall_minutes": (time.time() - t0) / 60,
            "job_minutes": sum(r.get("seconds", 0) for r in results.values()) / 60,
            "cpu_hours": sum(r.get("cpu_seconds", 0) for r in results.values()) / 3600,
            "results": results, "missing": missing}
    data["summary"] = summarise(results, budget, chance)
    paths = {ext: os.path.join(args.out, f"fidelity.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1)
    text = render_markdown(data)
    with open(paths["md"], "w") as f:
        f.write(text)
    plot(data, paths["png"])
    print(text)
    if missing:
        print(f"[fidelity] {len(missing)} job(s) not run (time limit): run the same command again to finish the table")
    if args.results:
        dest = os.path.join(ROOT, "benchmarks", "results")
        os.makedirs(dest, exist_ok=True)
        for path in paths.values():
            shutil.copy(path, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
