"""CPU inference latency of dense vs LRPET-factorised ResNet-50 models, next to their MACs ratio.

For each requested backbone MAC cut (or rank ratio ``p``) the real models are built from the
project's configs, their planned convs are projected to rank ``k`` (so the factorised model is
exact) and factorised with the library's own ``compress_model_``; then the dense and factorised
models are timed in eval mode under ``torch.inference_mode``:

* ``det``: detectron2 Faster R-CNN R50-C4 (``configs/faster_rcnn_lrpet.yaml``, random init): the
  backbone (stem..res4) and the whole model (RPN + ``Res5ROIHeads`` on ``--proposals`` boxes);
* ``seg``: mmseg PSPNet R50-D8 (``configs/pspnet_r50-d8_lrpet_voc12aug-512x512.py``, BN instead of
  SyncBN): the backbone and the whole model (``mode='tensor'``, no auxiliary head).

MACs come from the frameworks' own counters (detectron2 ``FlopCountAnalysis``, mmengine
``get_model_complexity_info``); "cut" is the fraction of the dense backbone's MACs removed.

Timing is made robust against a shared machine: warm-up calls, then ``--repeat`` rounds in which
every variant (dense and each factorised model) runs once, in turn, so that background load hits
all of them alike; the table gives the median wall time, and the speed-up is also given from the
minimum wall time and from the process CPU time (which a busy machine inflates far less; with
``--threads 1`` it is the idle latency). Run it on an idle machine for figures to publish.

    python benchmarks/bench_inference.py [--models det seg] [--cuts 0.3 0.5 | --ratios 0.43 0.6]
        [--size 512] [--threads 1 2] [--repeat 10] [--channels-last [--onednn-1x1-everywhere]] [--proposals 100] [--stock-1x1]
        [--parts backbone model] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lrpet_dense.core import project_  # noqa: E402
from lrpet_dense.core.factorize import PointwiseConv2d  # noqa: E402
from lrpet_dense.configs import config_path  # noqa: E402

DET_CFG = config_path("faster_rcnn_lrpet.yaml")
SEG_CFG = config_path("pspnet_r50-d8_lrpet_voc12aug-512x512.py")


# ------------------------------------------------------------------------------------------------
# Models: each builder returns a "bundle" with the dense model, the plan for a cut/ratio, and the
# callables to time. Building a variant = deepcopy of the dense model, project, factorise.
# ------------------------------------------------------------------------------------------------
class DetBundle:
    """detectron2 Faster R-CNN R50-C4 at an ``h x w`` input."""

    name = "det"
    title = "detectron2 Faster R-CNN R50-C4"

    def __init__(self, hw: Tuple[int, int], proposals: int):
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        from lrpet_dense.detectron2 import add_lrpet_config

        cfg = get_cfg()
        add_lrpet_config(cfg)
        cfg.merge_from_file(DET_CFG)
        cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RPN.POST_NMS_TOPK_TEST", proposals,
                             "MODEL.RPN.PRE_NMS_TOPK_TEST", max(proposals * 6, 1000),
                             "LRPET.PLAN_INPUT_SIZE", tuple(hw), "INPUT.MIN_SIZE_TEST", min(hw)])
        self.cfg = cfg
        self.hw = hw
        torch.manual_seed(0)
        self.dense = build_model(cfg).eval()
        # Random init: make the RPN predict its anchors as they are (zero deltas), so every model keeps
        # exactly ``proposals`` valid boxes and the ROI heads do the same work for dense and factorised.
        with torch.no_grad():
            self.dense.proposal_generator.rpn_head.anchor_deltas.weight.zero_()
            self.dense.proposal_generator.rpn_head.anchor_deltas.bias.zero_()
        g = torch.Generator().manual_seed(0)
        self.image = torch.rand(3, *hw, generator=g) * 255

    def plan(self, model, cut: Optional[float], ratio: Optional[float]):
        from lrpet_dense.detectron2 import build_plan, lrpet_config, pair_convs
        from lrpet_dense.detectron2.hook import default_plan_hw

        cfg = self.cfg.clone()
        cfg.LRPET.TARGET_MACS_CUT = float(cut or 0.0)
        cfg.LRPET.RATIO = None if cut else float(ratio if ratio is not None else 0.5)
        config = lrpet_config(cfg)
        layers = pair_convs(model, config).layers
        return layers, build_plan(model, layers, config, default_plan_hw(cfg))

    def compress_(self, model, plan) -> List[str]:
        from lrpet_dense.detectron2 import compress_model_

        return compress_model_(model, plan)

    def count(self, model) -> Dict[str, int]:
        from lrpet_dense.detectron2 import count_complexity

        f = {k: v["macs"] for k, v in count_complexity(model, self.hw).items()}
        return {"backbone": f["backbone"], "model": f["model"]}

    def backbone_fn(self, model, channels_last: bool) -> Callable[[], object]:
        x = ((self.image - model.pixel_mean) / model.pixel_std)[None]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return lambda: model.backbone(x)

    def model_fn(self, model, channels_last: bool) -> Callable[[], object]:
        inputs = [{"image": self.image, "height": self.hw[0], "width": self.hw[1]}]
        return lambda: model(inputs)


class SegBundle:
    """mmseg PSPNet R50-D8 (BN) at an ``h x w`` input."""

    name = "seg"
    title = "mmseg PSPNet R50-D8"

    def __init__(self, hw: Tuple[int, int]):
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmseg.registry import MODELS

        import lrpet_dense.mmseg  # noqa: F401  (registers LRPETEncoderDecoder)

        init_default_scope("mmseg")
        cfg = Config.fromfile(SEG_CFG)
        norm = dict(type="BN", requires_grad=True)
        cfg.merge_from_dict({"model.backbone.norm_cfg": norm, "model.decode_head.norm_cfg": norm,
                             "model.auxiliary_head.norm_cfg": norm, "model.pretrained": None,
                             "model.data_preprocessor.size": tuple(hw)})
        self.hw = hw
        torch.manual_seed(0)
        self.dense = MODELS.build(cfg.model).eval()
        self.image = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))

    def plan(self, model, cut: Optional[float], ratio: Optional[float]):
        from lrpet_dense.core import LRPETConfig
        from lrpet_dense.mmseg import build_plan, pair_convs

        config = LRPETConfig(ratio=None if cut else ratio, target_macs_cut=cut, plan_input_size=self.hw)
        layers = pair_convs(model, config).layers
        return layers, build_plan(model, layers, config)

    def compress_(self, model, plan) -> List[str]:
        from lrpet_dense.mmseg import compress_model_

        return compress_model_(model, plan)

    def count(self, model) -> Dict[str, int]:
        from lrpet_dense.mmseg import count_complexity

        c = count_complexity(model, self.hw)
        return {"backbone": c["backbone"]["macs"], "model": c["model"]["macs"]}

    def backbone_fn(self, model, channels_last: bool) -> Callable[[], object]:
        x = self.image.contiguous(memory_format=torch.channels_last) if channels_last else self.image
        return lambda: model.backbone(x)

    def model_fn(self, model, channels_last: bool) -> Callable[[], object]:
        x = self.image.contiguous(memory_format=torch.channels_last) if channels_last else self.image
        return lambda: model(x, mode="tensor")


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return _first_tensor(out[sorted(out)[-1]])
    return _first_tensor(out[-1])


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def time_interleaved(fns: Dict[str, Callable[[], object]], repeat: int, warmup: int) -> Dict[str, Dict[str, float]]:
    """Median/min wall time and median process CPU time of each callable, in interleaved rounds."""
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for r in range(repeat):
            keys = list(fns) if r % 2 == 0 else list(fns)[::-1]  # alternate the order, too
            for k in keys:
                c0, t0 = time.process_time(), time.perf_counter()
                fns[k]()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: {"wall_median_s": statistics.median(wall[k]), "wall_min_s": min(wall[k]),
                "cpu_median_s": statistics.median(cpu[k]), "wall_all_s": wall[k]} for k in fns}


# ------------------------------------------------------------------------------------------------
def build_variants(bundle, targets: Sequence[Tuple[Optional[float], Optional[float]]], log,
                   stock_1x1: bool = False) -> List[dict]:
    """One factorised copy of ``bundle.dense`` per (cut, ratio), with its plan, counts and output check."""
    out = []
    for cut, ratio in targets:
        model = copy.deepcopy(bundle.dense)
        layers, plan = bundle.plan(model, cut, ratio)
        project_(layers, plan)  # make the planned convs exactly rank-k, as LRPET training leaves them
        with torch.inference_mode():
            ref = _first_tensor(bundle.backbone_fn(model, False)()).clone()
        names = bundle.compress_(model, plan)
        model.eval()
        with torch.inference_mode():
            got = _first_tensor(bundle.backbone_fn(model, False)())
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        counts = bundle.count(model)
        log(f"  {bundle.name}: p={plan.ratio:g} (plan cut {plan.reached_macs_cut:.1%}), {len(names)}/{len(plan)} convs "
            f"factorised, backbone output rel. diff vs projected dense {err:.1e}")
        out.append({"model": model, "plan": plan, "target_cut": cut, "ratio": plan.ratio,
                    "plan_cut": plan.reached_macs_cut, "factorised": len(names), "planned": len(plan),
                    "counts": counts, "rel_diff": err, "label": ""})
        if stock_1x1:
            out.append(dict(out[-1], model=_with_stock_1x1(model), label="stock 1x1"))
    return out


def _with_stock_1x1(model: nn.Module) -> nn.Module:
    """A copy of a factorised model whose 1x1 convs are plain ``nn.Conv2d`` (PyTorch's kernel choice)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, PointwiseConv2d):
            m.__class__ = nn.Conv2d
    return model


class onednn_1x1_everywhere:
    """Context: every unstrided 1x1 conv (dense models' too) on channels_last CPU float32 input
    without autograd runs oneDNN, as :class:`PointwiseConv2d` does for the factorised ones.

    A fair baseline: without it the dense model's own 1x1 convs keep PyTorch's one-thread GEMM path
    while the factorised model's use oneDNN, and part of the measured speed-up would be the kernel,
    not the rank. Patches ``torch.nn.functional.conv2d``, which ``nn.Conv2d`` and detectron2's
    ``Conv2d`` call.
    """

    def __enter__(self):
        import torch.nn.functional as F

        self._orig = orig = F.conv2d

        def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
            pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
            if (not isinstance(padding, str) and weight.dim() == 4 and weight.shape[-2:] == (1, 1) and groups == 1
                    and pair(stride) == (1, 1) and pair(padding) == (0, 0) and pair(dilation) == (1, 1)
                    and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
                    and not torch.is_grad_enabled() and x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous()):
                w = weight.contiguous(memory_format=torch.channels_last)
                return torch.mkldnn_convolution(x, w, bias, (0, 0), (1, 1), (1, 1), 1)
            return orig(x, weight, bias, stride, padding, dilation, groups)

        F.conv2d = conv2d
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.conv2d = self._orig
        return False


def run_bundle(bundle, variants: List[dict], threads: int, args, log) -> List[dict]:
    dense_counts = bundle.dense_counts
    rows = []
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    models = [bundle.dense] + [v["model"] for v in variants]
    for m in models:
        m.to(memory_format=mf)
    for part in args.parts:
        make = bundle.backbone_fn if part == "backbone" else bundle.model_fn
        fns = {"dense": make(bundle.dense, args.channels_last)}
        for i, v in enumerate(variants):
            fns[f"f{i}"] = make(v["model"], args.channels_last)
        t0 = time.perf_counter()
        if args.onednn_1x1_everywhere:
            with onednn_1x1_everywhere():
                times = time_interleaved(fns, args.repeat, args.warmup)
        else:
            times = time_interleaved(fns, args.repeat, args.warmup)
        log(f"  timed {bundle.name}/{part} with {threads} thread(s) in {time.perf_counter() - t0:.0f}s")
        d = times["dense"]
        for i, v in enumerate(variants):
            f = times[f"f{i}"]
            macs_ratio = dense_counts[part] / v["counts"][part]
            speedup = d["wall_median_s"] / f["wall_median_s"]
            rows.append({
                "model": bundle.name, "part": part, "variant": v["label"] or "factorised", "threads": threads,
                "channels_last": args.channels_last, "onednn_1x1_everywhere": args.onednn_1x1_everywhere,
                "ratio_p": v["ratio"], "target_cut": v["target_cut"], "plan_cut": v["plan_cut"],
                "backbone_macs_cut": 1 - v["counts"]["backbone"] / dense_counts["backbone"],
                "macs_dense": dense_counts[part], "macs_factorised": v["counts"][part], "macs_ratio": macs_ratio,
                "dense_ms": d["wall_median_s"] * 1e3, "factorised_ms": f["wall_median_s"] * 1e3,
                "speedup": speedup, "speedup_over_macs_ratio": speedup / macs_ratio,
                "speedup_min": d["wall_min_s"] / f["wall_min_s"],
                "speedup_cpu": d["cpu_median_s"] / f["cpu_median_s"],
                "dense_cpu_ms": d["cpu_median_s"] * 1e3, "factorised_cpu_ms": f["cpu_median_s"] * 1e3,
                "dense_wall_all_ms": [t * 1e3 for t in d["wall_all_s"]],
                "factorised_wall_all_ms": [t * 1e3 for t in f["wall_all_s"]],
            })
    return rows


def format_table(rows: List[dict]) -> str:
    head = ("model", "part", "variant", "thr", "p", "bb MACs cut", "MACs ratio", "dense ms", "fact ms", "speed-up",
            "/MACs ratio", "s-up (min)", "s-up (CPU)")
    lines = []
    for r in rows:
        lines.append((r["model"], r["part"], r["variant"], str(r["threads"]), f"{r['ratio_p']:.4g}",
                      f"{r['backbone_macs_cut']:.1%}",
                      f"{r['macs_ratio']:.2f}x", f"{r['dense_ms']:.1f}", f"{r['factorised_ms']:.1f}",
                      f"{r['speedup']:.2f}x", f"{r['speedup_over_macs_ratio']:.2f}", f"{r['speedup_min']:.2f}x",
                      f"{r['speedup_cpu']:.2f}x"))
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(v.rjust(w) for v, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("det", "seg"), default=["det", "seg"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cuts", type=float, nargs="+", default=None,
                   help="backbone MAC cuts to solve the ratio p for (default 0.3 0.5)")
    g.add_argument("--ratios", type=float, nargs="+", default=None, help="rank ratios p instead of cuts")
    p.add_argument("--size", type=int, nargs="+", default=[512], metavar="S",
                   help="input H W (one value: square). Default 512")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch intra-op thread counts to time with (default: torch's default)")
    p.add_argument("--repeat", type=int, default=10, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="run all models in channels_last memory format")
    p.add_argument("--proposals", type=int, default=100,
                   help="detectron2 RPN post-NMS proposals at test time (detectron2's default: 1000)")
    p.add_argument("--parts", nargs="+", choices=("backbone", "model"), default=["backbone", "model"],
                   help="what to time: the backbone and/or the whole model")
    p.add_argument("--stock-1x1", action="store_true",
                   help="also time each factorised model with its 1x1 convs as plain nn.Conv2d (PyTorch's own "
                        "kernel choice instead of PointwiseConv2d's), interleaved with the others")
    p.add_argument("--onednn-1x1-everywhere", action="store_true",
                   help="give the dense model's 1x1 convs the same oneDNN kernel as the factorised ones "
                        "(channels_last only), so the speed-up measures the rank, not the kernel choice")
    p.add_argument("--json", default=None, help="write all figures (and every timing) to this JSON file")
    args = p.parse_args(argv)
    if len(args.size) not in (1, 2):
        p.error("--size takes H or H W")
    hw = (args.size[0], args.size[-1])
    targets = ([(None, r) for r in args.ratios] if args.ratios else [(c, None) for c in (args.cuts or [0.3, 0.5])])
    logging.basicConfig(level=logging.WARNING)
    log = lambda s: print(s, flush=True)  # noqa: E731
    threads_list = args.threads or [torch.get_num_threads()]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    log(f"torch {torch.__version__}, {machine}, input {hw[0]}x{hw[1]}, repeat {args.repeat}, "
        f"{'channels_last' if args.channels_last else 'contiguous (NCHW)'}, load average {load}")
    rows = []
    for name in args.models:
        bundle = DetBundle(hw, args.proposals) if name == "det" else SegBundle(hw)
        log(f"{bundle.title}: building factorised variants")
        bundle.dense_counts = bundle.count(bundle.dense)
        variants = build_variants(bundle, targets, log, args.stock_1x1)
        for threads in threads_list:
            torch.set_num_threads(threads)
            rows += run_bundle(bundle, variants, threads, args, log)
        del bundle, variants
    log("")
    log(format_table(rows))
    log("speed-up = median dense wall time / median factorised wall time; '/MACs ratio' = speed-up / MACs ratio "
        "(goal >= 0.8 at a 50% cut); s-up (min): from the minimum wall times; s-up (CPU): from process CPU time.")
    result = {"torch": torch.__version__, "machine": machine, "load_average_at_start": load, "input_hw": list(hw),
              "repeat": args.repeat, "channels_last": args.channels_last,
              "onednn_1x1_everywhere": args.onednn_1x1_everywhere, "proposals": args.proposals, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
