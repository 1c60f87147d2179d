"""Training-time overhead of the LRPET hook in real detectron2 and mmseg training loops (CPU).

Hundreds of iterations are too slow to time directly on a CPU, so the overhead at the default
interval is computed from what is measured:

(a) the mean wall time of one training iteration *without* the hook, in the frameworks' own
    loops (``tools/train_det.py``'s ``Trainer``, a ``DefaultTrainer``, on
    ``configs/toy/faster_rcnn_lrpet_toy.yaml``; mmengine's ``Runner`` on
    ``configs/toy/pspnet_r50-d8_lrpet_toy.py``), timed between consecutive iterations (data
    loading, forward, backward, optimizer step and every other hook included), after warm-up;
(b) the wall time of one projection, as the hook does it (the hook's own plan, layers and
    projector, built from the hook's config: detectron2 ``LRPET.*`` of
    ``configs/faster_rcnn_lrpet.yaml``; mmseg: the ``LRPETHook`` entry of
    ``configs/pspnet_r50-d8_lrpet_voc12aug-512x512.py``), on the trained model, ``--projections`` times;

then ``overhead = projection time / (interval x iteration time)`` with the hooks' default
``interval`` (detectron2 ``LRPET.INTERVAL``, mmseg ``LRPETHook(interval=...)``: 500). The
projection cost does not depend on the input size, so small toy images give a pessimistic (upper)
figure; ``--det-size`` / ``--seg-crop`` make the iterations more realistic. ``--cross-check N``
also times the loop with the hook on at ``interval=N`` against the loop without it.

    python benchmarks/bench_training_overhead.py [--frameworks det seg] [--iters 8] [--warmup 2]
        [--projections 5] [--det-size 128] [--seg-crop 64] [--cross-check 2] [--json PATH]

Toy data are generated into a temporary folder (``lrpet_dense.data.toy_voc``) unless ``--data``
names one made by ``python -m lrpet_dense.data.toy_voc ROOT``.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch
from _common import save_json, text_table  # benchmarks/_common.py
from lrpet_dense.configs import config_path  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DET_TOY = config_path("toy/faster_rcnn_lrpet_toy.yaml")
DET_FULL = config_path("faster_rcnn_lrpet.yaml")
SEG_TOY = config_path("toy/pspnet_r50-d8_lrpet_toy.py")
SEG_FULL = config_path("pspnet_r50-d8_lrpet_voc12aug-512x512.py")


def _summary(xs: List[float]) -> Dict[str, float]:
    return {"mean_s": statistics.fmean(xs), "median_s": statistics.median(xs), "min_s": min(xs), "n": len(xs),
            "all_s": xs}


# ------------------------------------------------------------------------------------------------ detectron2
def _det_cfg(args, out_dir: str, lrpet: bool, interval: Optional[int]):
    from detectron2.config import get_cfg

    from lrpet_dense.detectron2 import add_lrpet_config

    cfg = get_cfg()
    add_lrpet_config(cfg)
    default_interval = int(cfg.LRPET.INTERVAL)
    full = get_cfg()
    add_lrpet_config(full)
    full.merge_from_file(DET_FULL)
    cfg.merge_from_file(DET_TOY)
    s = args.det_size
    cfg.merge_from_list([
        "OUTPUT_DIR", out_dir, "SOLVER.MAX_ITER", args.warmup + args.iters, "SOLVER.CHECKPOINT_PERIOD", 10 ** 6,
        "TEST.PRECISE_BN.ENABLED", False, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", (),  # no evaluation
        "INPUT.MIN_SIZE_TRAIN", (s,), "INPUT.MAX_SIZE_TRAIN", max(s * 5 // 3, s), "INPUT.MIN_SIZE_TEST", s,
        "INPUT.MAX_SIZE_TEST", max(s * 5 // 3, s),
        # the hook settings of the real recipe (50% backbone cut, ET + BNR), at the chosen interval
        "LRPET.ENABLED", lrpet, "LRPET.TARGET_MACS_CUT", float(full.LRPET.TARGET_MACS_CUT),
        "LRPET.INTERVAL", interval or default_interval,
    ])
    return cfg, default_interval


def _det_trainer_cls():
    spec = importlib.util.spec_from_file_location("lrpet_train_det", os.path.join(ROOT, "tools", "train_det.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Trainer


def _det_loop(args, devkit: str, lrpet: bool, interval: Optional[int] = None) -> dict:
    """Iteration times of tools/train_det.py's Trainer (first ``warmup`` dropped), and the trainer."""
    from detectron2.engine import HookBase

    Trainer = _det_trainer_cls()
    times: List[float] = []

    class StepTimer(HookBase):
        """Wall time between consecutive ``after_step`` calls: a whole iteration, every hook included."""

        def before_train(self):
            self._t = time.perf_counter()

        def after_step(self):
            t = time.perf_counter()
            times.append(t - self._t)
            self._t = t

    with tempfile.TemporaryDirectory() as out:
        cfg, default_interval = _det_cfg(args, out, lrpet, interval)
        cfg.freeze()
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.register_hooks([StepTimer()])
        trainer.train()
    return {"iter": _summary(times[args.warmup:]), "trainer": trainer, "cfg": cfg, "default_interval": default_interval}


def bench_det(args, data_root: str, log) -> dict:
    from lrpet_dense.detectron2 import LRPETHook, register_toy_voc

    devkit = os.path.join(data_root, "VOCdevkit")
    register_toy_voc(devkit)
    log(f"detectron2: {args.warmup}+{args.iters} iterations of the toy Faster R-CNN R50-C4 without the hook "
        f"(images {args.det_size}px short side, batch 2)")
    run = _det_loop(args, devkit, lrpet=False)
    interval = run["default_interval"]
    cfg = run["cfg"].clone()
    cfg.defrost()
    cfg.LRPET.ENABLED = True
    model = run["trainer"].model
    hook = LRPETHook.from_config(cfg, model)  # the hook train_det.py would install, on the trained model
    proj = []
    for i in range(args.projections):
        proj.append(hook.projector.project_(hook.layers, hook.plan, (i + 1) * interval).seconds)
    res = {"framework": "detectron2", "config": os.path.relpath(DET_TOY, ROOT),
           "input": f"{args.det_size}px short side",
           "batch": int(cfg.SOLVER.IMS_PER_BATCH), "interval": interval, "layers": len(hook.plan),
           "iter": run["iter"], "projection": _summary(proj)}
    if args.cross_check:
        log(f"detectron2: cross-check, {args.warmup}+{args.iters} iterations with the hook at interval "
            f"{args.cross_check}")
        res["cross_check"] = {"interval": args.cross_check,
                              "iter_with_hook": _det_loop(args, devkit, True, args.cross_check)["iter"]}
    return res


# ------------------------------------------------------------------------------------------------ mmseg
def _seg_cfg(args, data_root: str, work_dir: str, hooks: list):
    from mmengine.config import Config

    os.environ["LRPET_TOY_VOC_ROOT"] = data_root
    cfg = Config.fromfile(SEG_TOY)
    crop = (args.seg_crop, args.seg_crop)
    n = args.warmup + args.iters
    cfg.work_dir = work_dir
    cfg.model.data_preprocessor.size = crop
    pipe = cfg.train_dataloader.dataset.pipeline
    for t in pipe:
        if t["type"] == "RandomResize":
            t["scale"] = (2 * crop[0], crop[0])
        elif t["type"] == "RandomCrop":
            t["crop_size"] = crop
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=n, val_interval=10 ** 9)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # no validation after the last iteration
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.param_scheduler = [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=n, by_epoch=False)]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=10 ** 9, save_last=False)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=10, log_metric_by_epoch=False)
    cfg.custom_hooks = hooks
    # mmengine keeps visualizers and loggers as named singletons: give every runner its own
    tag = f"lrpet_bench_{os.getpid()}_{time.monotonic_ns()}"
    cfg.experiment_name = tag
    cfg.visualizer.name = tag
    return cfg


def _seg_hook_cfg(interval: Optional[int] = None) -> dict:
    """The LRPETHook entry of the full PSPNet LRPET config (optionally at another interval)."""
    from mmengine.config import Config

    hook = dict(Config.fromfile(SEG_FULL).custom_hooks[0])
    if interval is not None:
        hook["interval"] = interval
    return hook


def _seg_loop(args, data_root: str, hooks: list):
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    times: List[float] = []

    class StepTimer(Hook):
        priority = "LOWEST"

        def before_train(self, runner):
            self._t = time.perf_counter()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            t = time.perf_counter()
            times.append(t - self._t)
            self._t = t

    with tempfile.TemporaryDirectory() as work:
        cfg = _seg_cfg(args, data_root, work, hooks)
        runner = Runner.from_cfg(cfg)
        runner.register_hook(StepTimer(), priority="LOWEST")
        runner.train()
    return _summary(times[args.warmup:]), runner


def bench_seg(args, data_root: str, log) -> dict:
    from lrpet_dense.core import LRPETConfig
    from lrpet_dense.mmseg import LRPETHook

    default_interval = LRPETConfig().interval
    hook_cfg = _seg_hook_cfg()
    log(f"mmseg: {args.warmup}+{args.iters} iterations of the toy PSPNet R50-D8 without the hook "
        f"(crop {args.seg_crop}x{args.seg_crop}, batch 2)")
    it, runner = _seg_loop(args, data_root, [])
    kwargs = {k: v for k, v in hook_cfg.items() if k != "type"}
    hook = LRPETHook(**kwargs)
    hook.before_train(runner)  # pairing and plan on the trained model, as in a real run
    proj = [hook.projector.project_(hook.layers, hook.plan, (i + 1) * hook.config.interval).seconds
            for i in range(args.projections)]
    res = {"framework": "mmseg", "config": os.path.relpath(SEG_TOY, ROOT),
           "input": f"crop {args.seg_crop}x{args.seg_crop}",
           "batch": 2, "interval": int(hook_cfg.get("interval", default_interval)),
           "default_interval": default_interval, "layers": len(hook.plan), "iter": it, "projection": _summary(proj)}
    if args.cross_check:
        log(f"mmseg: cross-check, {args.warmup}+{args.iters} iterations with the hook at interval {args.cross_check}")
        with_hook, _ = _seg_loop(args, data_root, [_seg_hook_cfg(args.cross_check)])
        res["cross_check"] = {"interval": args.cross_check, "iter_with_hook": with_hook}
    return res


# ------------------------------------------------------------------------------------------------
def _report(results: List[dict]) -> str:
    head = ("framework", "input", "iter (mean)", "iter (median)", "projection (median)", "layers", "interval",
            "amortised overhead")
    rows = []
    for r in results:
        rows.append((r["framework"], r["input"], f"{r['iter']['mean_s']:.3f} s", f"{r['iter']['median_s']:.3f} s",
                     f"{r['projection']['median_s']:.3f} s", str(r["layers"]), str(r["interval"]),
                     f"{r['overhead']:.3%}"))
    lines = [text_table(head, rows)]
    for r in results:
        cc = r.get("cross_check")
        if cc:
            w = cc["iter_with_hook"]["mean_s"]
            lines.append(f"{r['framework']} cross-check at interval {cc['interval']}: iteration {w:.3f} s with the hook "
                         f"vs {r['iter']['mean_s']:.3f} s without: {w / r['iter']['mean_s'] - 1:+.1%} measured, "
                         f"{r['projection']['median_s'] / (cc['interval'] * r['iter']['mean_s']):+.1%} predicted")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frameworks", nargs="+", choices=("det", "seg"), default=["det", "seg"])
    p.add_argument("--iters", type=int, default=8, help="timed iterations per loop (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="iterations run before timing starts")
    p.add_argument("--projections", type=int, default=5, help="projections timed per framework")
    p.add_argument("--det-size", type=int, default=128, help="detectron2 training image short side (toy images)")
    p.add_argument("--seg-crop", type=int, default=64, help="mmseg training crop size")
    p.add_argument("--cross-check", type=int, default=0, metavar="N",
                   help="also time the loop with the hook at interval N (0: skip)")
    p.add_argument("--data", default=None, help="a toy VOC root (holding VOCdevkit/); default: generate one")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("detectron2", "fvcore", "mmengine", "lrpet_dense"):
        logging.getLogger(name).setLevel(logging.WARNING)
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    log(f"torch {torch.__version__}, {machine}, load average {load}")
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data
        if data_root is None:
            from lrpet_dense.data.toy_voc import make_toy_voc

            data_root = os.path.join(tmp, "toy_voc")
            size = max(args.det_size, 2 * args.seg_crop)
            make_toy_voc(data_root, num_train=16, num_test=8, size=size)
            log(f"toy VOC data ({size}px images) in {data_root}")
        results = []
        for fw in args.frameworks:
            r = bench_det(args, data_root, log) if fw == "det" else bench_seg(args, data_root, log)
            r["overhead"] = r["projection"]["median_s"] / (r["interval"] * r["iter"]["mean_s"])
            results.append(r)
    log("")
    log(_report(results))
    log("amortised overhead = projection time / (interval x iteration time); goal <= 1% "
        "(paper: +3.2% on CIFAR ResNet-56; TRP, projecting every step: +371%)")
    out = {"torch": torch.__version__, "machine": machine, "load_average_at_start": load, "results": results}
    save_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
