"""Inference latency of dense vs LRPET-factorised ResNet-50 models, next to their MACs ratio.

For each requested plan (a backbone MAC cut, a rank ratio ``p``, or a cut of the measured per-layer
latency; ranks optionally rounded to a multiple) the real models are built from the project's
configs, their planned convs are projected to rank ``k`` (so the factorised model is exact) and
factorised with the library's own ``compress_model_``; by default both the dense and the factorised
model are then put in the deploy path's inference form (``to_inference_``: BatchNorm folded into the
convs, channels_last on CPU, checked in float64), and timed in eval mode under
``torch.inference_mode`` (``--onnx``: also exported to ONNX and timed in ONNX Runtime; ``--compile``:
the backbones also under ``torch.compile`` with inductor's freezing; ``--device cuda [--fp16]``: timed
with CUDA events):

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
        [--latency-cuts 0.3] [--rank-multiple 1 16] [--size 512] [--threads 1 2] [--repeat 10] [--no-deploy]
        [--onnx] [--compile] [--stages] [--device cuda [--fp16]] [--channels-last [--onednn-1x1-everywhere]] [--proposals 100]
        [--stock-1x1] [--parts backbone model] [--json PATH]
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

from _common import cpu_name, save_json, text_table  # noqa: E402  (benchmarks/_common.py)
from lrpet_dense.core import project_  # noqa: E402
from lrpet_dense.core.macs import conv_macs  # noqa: E402
from lrpet_dense.core.factorize import PointwiseConv2d  # noqa: E402
from lrpet_dense.configs import config_path  # noqa: E402

DET_CFG = config_path("faster_rcnn_lrpet.yaml")
SEG_CFG = config_path("pspnet_r50-d8_lrpet_voc12aug-512x512.py")


# ------------------------------------------------------------------------------------------------
# Models: each builder returns a "bundle" with the dense model, the plan for a cut/ratio, and the
# callables to time. Building a variant = deepcopy of the dense model, project, factorise.
# ------------------------------------------------------------------------------------------------
class _Bundle:
    """What both bundles share: the backbone call on the bundle's input."""

    def backbone_input(self, model) -> torch.Tensor:
        raise NotImplementedError

    def backbone_fn(self, model, channels_last: bool) -> Callable[[], object]:
        x = self.backbone_input(model)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return lambda: model.backbone(x)


class DetBundle(_Bundle):
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

    def plan(self, model, changes: dict):
        from lrpet_dense.detectron2 import build_plan, default_plan_hw, lrpet_config, pair_convs

        config = lrpet_config(self.cfg).replace(ratio=None, target_macs_cut=None).replace(**changes)
        layers = pair_convs(model, config).layers
        return layers, build_plan(model, layers, config, default_plan_hw(model, self.cfg))

    def compress_(self, model, plan) -> List[str]:
        from lrpet_dense.detectron2 import compress_model_

        return compress_model_(model, plan)

    def deploy_(self, model):
        from lrpet_dense.detectron2 import to_inference_

        return to_inference_(model, check_hw=(128, 128))

    def export_(self, model, path: str, align_ranks: int) -> List[torch.Tensor]:
        from lrpet_dense.detectron2 import export_onnx

        export_onnx(model, path, self.hw, align_ranks=align_ranks)
        return [self.image]

    def count(self, model) -> Dict[str, int]:
        from lrpet_dense.detectron2 import count_complexity

        f = {k: v["macs"] for k, v in count_complexity(model, self.hw).items()}
        return {"backbone": f["backbone"], "model": f["model"]}

    def backbone_input(self, model) -> torch.Tensor:
        return ((self.image - model.pixel_mean) / model.pixel_std)[None]


    def model_fn(self, model, channels_last: bool) -> Callable[[], object]:
        inputs = [{"image": self.image, "height": self.hw[0], "width": self.hw[1]}]
        return lambda: model(inputs)


class SegBundle(_Bundle):
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

    def plan(self, model, changes: dict):
        from lrpet_dense.core import LRPETConfig
        from lrpet_dense.mmseg import build_plan, pair_convs

        config = LRPETConfig(plan_input_size=self.hw).replace(**changes)
        layers = pair_convs(model, config).layers
        return layers, build_plan(model, layers, config)

    def compress_(self, model, plan) -> List[str]:
        from lrpet_dense.mmseg import compress_model_

        return compress_model_(model, plan)

    def deploy_(self, model):
        from lrpet_dense.mmseg import to_inference_

        return to_inference_(model)

    def export_(self, model, path: str, align_ranks: int) -> List[torch.Tensor]:
        from lrpet_dense.mmseg import export_onnx

        export_onnx(model, path, self.hw, align_ranks=align_ranks)
        return [torch.randn(1, 3, *self.hw, generator=torch.Generator().manual_seed(0))]

    def count(self, model) -> Dict[str, int]:
        from lrpet_dense.mmseg import count_complexity

        c = count_complexity(model, self.hw)
        return {"backbone": c["backbone"]["macs"], "model": c["model"]["macs"]}

    def backbone_input(self, model) -> torch.Tensor:
        return self.image


    def model_fn(self, model, channels_last: bool) -> Callable[[], object]:
        x = self.image.contiguous(memory_format=torch.channels_last) if channels_last else self.image
        return lambda: model(x, mode="tensor")


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def time_interleaved(fns: Dict[str, Callable[[], object]], repeat: int, warmup: int,
                     cuda: bool = False, fp16: bool = False) -> Dict[str, Dict[str, float]]:
    """Median/min wall time and median process CPU time of each callable, in interleaved rounds.

    On CUDA the wall time is the CUDA events' elapsed time of each call (queued work included);
    ``fp16`` runs under ``torch.autocast(float16)``.
    """
    import contextlib

    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    amp = torch.autocast("cuda", dtype=torch.float16) if fp16 else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for r in range(repeat):
            keys = list(fns) if r % 2 == 0 else list(fns)[::-1]  # alternate the order, too
            for k in keys:
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    c0 = time.process_time()
                    start.record()
                    fns[k]()
                    end.record()
                    torch.cuda.synchronize()
                    wall[k].append(start.elapsed_time(end) / 1e3)
                    cpu[k].append(time.process_time() - c0)
                    continue
                c0, t0 = time.process_time(), time.perf_counter()
                fns[k]()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: {"wall_median_s": statistics.median(wall[k]), "wall_min_s": min(wall[k]),
                "cpu_median_s": statistics.median(cpu[k]), "wall_all_s": wall[k]} for k in fns}


# ------------------------------------------------------------------------------------------------
def build_variants(bundle, targets: Sequence[dict], log, stock_1x1: bool = False, deploy: bool = True,
                   unreached: Optional[List[dict]] = None) -> List[dict]:
    """One factorised copy of ``bundle.dense`` per target (config changes: a MAC cut, a ratio or a measured
    latency cut, with a rank multiple), with its plan, counts, and the float64 checks of compression
    and of the deploy path (BN folded, channels_last on CPU). A latency cut the measured table shows out
    of reach is logged and appended to ``unreached``, not fatal."""
    out = []
    for changes in targets:
        model = copy.deepcopy(bundle.dense)
        try:
            layers, plan = bundle.plan(model, changes)
        except ValueError as e:
            if not changes.get("target_latency_cut"):
                raise
            # the measured table may show the target out of reach on this device and input size: a finding
            log(f"  {bundle.name} {_label(changes)}: no plan ({e})")
            if unreached is not None:
                unreached.append({"model": bundle.name, "target": _label(changes), "reason": str(e)})
            continue
        project_(layers, plan)  # make the planned convs exactly rank-k, as LRPET training leaves them
        names = bundle.compress_(model, plan)  # checked against the projected dense model in float64
        counts = bundle.count(model)
        if deploy:
            bundle.deploy_(model)  # checked too
        lat = plan.latency
        log(f"  {bundle.name} {_label(changes)}: p={plan.ratio:g}, MAC cut {plan.reached_macs_cut:.1%}"
            + (f", table-predicted latency cut {lat['reached']:.1%}" if lat else "")
            + f", {len(names)}/{len(plan)} convs factorised ({len(plan.left_dense)} left dense)")
        out.append({"model": model, "plan": plan, "changes": changes, "ratio": plan.ratio,
                    "plan_cut": plan.reached_macs_cut, "predicted_latency_cut": lat.get("reached") if lat else None,
                    "factorised": len(names), "planned": len(plan), "counts": counts, "label": _label(changes)})
        if stock_1x1:
            out.append(dict(out[-1], model=_with_stock_1x1(model), label=_label(changes) + " stock 1x1"))
    return out


def _per_model(path: str, model: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}_{model}{ext or '.json'}"


def _label(changes: dict) -> str:
    parts = []
    if changes.get("target_macs_cut"):
        parts.append(f"MACs -{changes['target_macs_cut']:.0%}")
    if changes.get("target_latency_cut"):
        parts.append(f"latency -{changes['target_latency_cut']:.0%}")
    if changes.get("ratio") is not None:
        parts.append(f"p={changes['ratio']:g}")
    if changes.get("rank_multiple", 1) > 1:
        parts.append(f"ranks x{changes['rank_multiple']}")
    return ", ".join(parts)


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
    cl = args.channels_last or args.deploy  # the deploy path chooses channels_last on CPU
    if not args.deploy:
        for m in [bundle.dense] + [v["model"] for v in variants]:
            m.to(memory_format=mf)
    for part in args.parts:
        make = bundle.backbone_fn if part == "backbone" else bundle.model_fn
        fns = {"dense": make(bundle.dense, cl)}
        for i, v in enumerate(variants):
            fns[f"f{i}"] = make(v["model"], cl)
        t0 = time.perf_counter()
        if args.onednn_1x1_everywhere:
            with onednn_1x1_everywhere():
                times = time_interleaved(fns, args.repeat, args.warmup, args.device == "cuda", args.fp16)
        else:
            times = time_interleaved(fns, args.repeat, args.warmup, args.device == "cuda", args.fp16)
        log(f"  timed {bundle.name}/{part} with {threads} thread(s) in {time.perf_counter() - t0:.0f}s")
        d = times["dense"]
        for i, v in enumerate(variants):
            f = times[f"f{i}"]
            rows.append(_row(bundle, part, v, threads, d, f, dense_counts, args, runtime="pytorch"))
    if args.stages:
        stage_rows(bundle, variants, args, log)
    if args.compile and "backbone" in args.parts:
        rows += _inductor_rows(bundle, variants, threads, args, log, dense_counts)
    if args.onnx:
        rows += _ort_rows(bundle, variants, threads, args, log, dense_counts)
    return rows


def _span_profile(bundle, model, parts: Sequence[Tuple[str, nn.Module]], repeat: int,
                  warmup: int) -> Dict[str, Tuple[float, int]]:
    """``{name: (median ms, conv MACs)}`` of each of ``parts`` (modules of ``model``) during the backbone's
    forward, timed by forward hooks."""
    spans: Dict[str, List[float]] = {name: [] for name, _ in parts}
    macs: Dict[str, int] = {name: 0 for name, _ in parts}
    handles, counting = [], [True]
    for name, part in parts:
        handles.append(part.register_forward_pre_hook(lambda m, i, n=name: spans[n].append(-time.perf_counter())))
        handles.append(part.register_forward_hook(lambda m, i, o, n=name: spans[n].__setitem__(
            -1, spans[n][-1] + time.perf_counter())))
        for conv in part.modules():
            if isinstance(conv, nn.Conv2d):
                def count(m, i, o, n=name):
                    if counting[0]:
                        macs[n] += o.shape[0] * conv_macs(tuple(m.weight.shape), o.shape[2:])
                handles.append(conv.register_forward_hook(count))
    fn = bundle.backbone_fn(model, True)
    try:
        with torch.inference_mode():
            fn()
            counting[0] = False
            for _ in range(warmup):
                fn()
            for name in spans:
                spans[name].clear()
            for _ in range(repeat):
                fn()
    finally:
        for h in handles:
            h.remove()
    return {name: (statistics.median(spans[name]) * 1e3, macs[name]) for name in spans if spans[name]}


def stage_rows(bundle, variants, args, log) -> None:
    """Print where the backbone's time goes, stage by stage: dense vs each variant, time and conv MACs ratios;
    for a latency plan, also the latency table's predicted cut of the selected convs next to the cut
    measured on those convs inside the model."""
    dense = _span_profile(bundle, bundle.dense, list(bundle.dense.backbone.named_children()), args.repeat, args.warmup)
    for v in variants:
        fact = _span_profile(bundle, v["model"], list(v["model"].backbone.named_children()), args.repeat, args.warmup)
        log(f"  {bundle.name} backbone stages, {v['label']} (median ms; conv MACs from forward hooks):")
        for name, (td, md) in dense.items():
            tf, mf = fact[name]
            ratio = md / mf if mf else float("nan")
            log(f"    {name:10s} dense {td:8.2f} ms {md / 1e9:6.3f} GMAC ({td / (md / 1e9) if md else 0:5.1f} ms/GMAC)  "
                f"factorised {tf:8.2f} ms {mf / 1e9:6.3f} GMAC  speed-up {td / tf:.2f}x for {ratio:.2f}x MACs")
        table_path = v["changes"].get("latency_table")
        if v["changes"].get("target_latency_cut") and table_path and os.path.isfile(table_path):
            _check_table(bundle, v, table_path, args, log)


def _check_table(bundle, v, table_path: str, args, log) -> None:
    """The latency table's prediction for the selected convs the backbone runs, against their time measured
    inside the model (forward hooks), dense and as planned."""
    from lrpet_dense.core.factorize import FactorizedConv2d
    from lrpet_dense.core.latency import LatencyTable

    with open(table_path) as fh:
        table = LatencyTable.from_dict(json.load(fh))
    names = [n for n in v["plan"].ranks if n in table.layers]
    d = _span_profile(bundle, bundle.dense, [(n, bundle.dense.get_submodule(n)) for n in names], args.repeat,
                      args.warmup)
    f = _span_profile(bundle, v["model"], [(n, v["model"].get_submodule(n)) for n in names], args.repeat, args.warmup)
    ran = [n for n in names if n in d and n in f]  # the backbone's (detectron2's res5 runs in the ROI head)
    pd = sum(table.dense_ms(n) for n in ran)
    pf = sum(table.factorized_ms(n, v["plan"][n].rank) if isinstance(v["model"].get_submodule(n), FactorizedConv2d)
             else table.dense_ms(n) for n in ran)
    md, mf = sum(d[n][0] for n in ran), sum(f[n][0] for n in ran)
    log(f"    the backbone's {len(ran)} selected convs: latency table {pd:.1f} -> {pf:.1f} ms (predicted cut "
        f"{1 - pf / pd:.1%}); in the model {md:.1f} -> {mf:.1f} ms (measured cut {1 - mf / md:.1%})")


def _inductor_rows(bundle, variants, threads, args, log, dense_counts) -> List[dict]:
    """The backbones (deploy form) under ``torch.compile`` with inductor's freezing (weights prepacked, conv
    epilogues fused), timed alike."""
    import torch._inductor.config as inductor_config

    fns = {}
    t0 = time.perf_counter()
    with inductor_config.patch(freezing=True):
        for key, model in [("dense", bundle.dense)] + [(f"f{i}", v["model"]) for i, v in enumerate(variants)]:
            x = bundle.backbone_input(model).contiguous(memory_format=torch.channels_last)
            compiled = torch.compile(model.backbone)
            with torch.inference_mode():
                compiled(x)  # compile now, not in the timed calls
            fns[key] = lambda c=compiled, x=x: c(x)
        log(f"  compiled {len(fns)} {bundle.name} backbones in {time.perf_counter() - t0:.0f}s")
        times = time_interleaved(fns, args.repeat, args.warmup)
    return [_row(bundle, "backbone", v, threads, times["dense"], times[f"f{i}"], dense_counts, args, runtime="inductor")
            for i, v in enumerate(variants)]


def _row(bundle, part, v, threads, d, f, dense_counts, args, runtime):
    macs_ratio = dense_counts[part] / v["counts"][part]
    speedup = d["wall_median_s"] / f["wall_median_s"]
    return {
        "model": bundle.name, "part": part, "runtime": runtime, "variant": v["label"] or "factorised",
        "threads": threads, "device": args.device, "fp16": args.fp16, "deploy": args.deploy,
        "channels_last": args.channels_last or args.deploy, "onednn_1x1_everywhere": args.onednn_1x1_everywhere,
        "ratio_p": v["ratio"], "plan_cut": v["plan_cut"], "predicted_latency_cut": v["predicted_latency_cut"],
        "backbone_macs_cut": 1 - v["counts"]["backbone"] / dense_counts["backbone"],
        "macs_dense": dense_counts[part], "macs_factorised": v["counts"][part], "macs_ratio": macs_ratio,
        "dense_ms": d["wall_median_s"] * 1e3, "factorised_ms": f["wall_median_s"] * 1e3,
        "speedup": speedup, "speedup_over_macs_ratio": speedup / macs_ratio,
        "measured_latency_cut": 1 - 1 / speedup,
        "speedup_min": d["wall_min_s"] / f["wall_min_s"],
        "speedup_cpu": d["cpu_median_s"] / f["cpu_median_s"] if f.get("cpu_median_s") else float("nan"),
        "dense_wall_all_ms": [t * 1e3 for t in d.get("wall_all_s", [])],
        "factorised_wall_all_ms": [t * 1e3 for t in f.get("wall_all_s", [])],
    }


class _BackboneOutputs(nn.Module):
    """A backbone whose outputs (a dict or a sequence of feature maps) become a tuple, for ONNX export."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.backbone(x)
        return tuple(out[k] for k in sorted(out)) if isinstance(out, dict) else tuple(out)


def _export_backbone(bundle, model, path: str, align_ranks: int) -> List[torch.Tensor]:
    """The backbone alone to ONNX (TorchScript exporter), its ranks aligned as the export path aligns them,
    checked in ONNX Runtime against PyTorch's backbone as given."""
    from lrpet_dense.core.export import export_aligned

    x = bundle.backbone_input(model).contiguous()
    export_aligned(model.backbone, _BackboneOutputs, (x,), path, align_ranks=align_ranks, dynamo=False)
    return [x]


def _aligned_counts(bundle, v, multiple: int) -> Dict[str, int]:
    """MACs of the variant as the export path writes it (ranks zero-padded to ``multiple``)."""
    from lrpet_dense.core.deploy import aligned_for_export

    padded, names = aligned_for_export(v["model"], multiple)
    return bundle.count(padded) if names else v["counts"]


def _ort_rows(bundle, variants, threads, args, log, dense_counts) -> List[dict]:
    """The backbones and/or whole models exported to ONNX (ranks padded to each ``--align-ranks`` value, checked
    against PyTorch in ONNX Runtime) and timed there in interleaved rounds, the dense file with them."""
    import tempfile

    from lrpet_dense.core.export import ort_runner

    rows = []
    exported_macs = {}
    for part in args.parts:
        if part == "model":
            export = lambda m, f, a: bundle.export_(m, f, a)  # noqa: E731
        else:
            export = lambda m, f, a: _export_backbone(bundle, m, f, a)  # noqa: E731
        with tempfile.TemporaryDirectory(prefix="lrpet_onnx_") as tmp:
            dense_path = os.path.join(tmp, "dense.onnx")
            inputs = export(bundle.dense, dense_path, 1)
            fns = {"dense": ort_runner(dense_path, inputs, threads)}
            for align in args.align_ranks:
                for i, v in enumerate(variants):
                    path = os.path.join(tmp, f"a{align}_f{i}.onnx")
                    export(v["model"], path, align)
                    fns[align, i] = ort_runner(path, inputs, threads)
            times = time_interleaved(fns, args.repeat, args.warmup)
        for align in args.align_ranks:
            runtime = "onnxruntime" if align == 1 else f"onnxruntime pad{align}"
            for i, v in enumerate(variants):
                row = _row(bundle, part, v, threads, times["dense"], times[align, i], dense_counts, args, runtime=runtime)
                if (align, i) not in exported_macs:  # what the file computes: the plan's MACs plus padded zeros
                    exported_macs[align, i] = _aligned_counts(bundle, v, align)
                row.update(align_ranks=align, macs_factorised_exported=exported_macs[align, i][part])
                rows.append(row)
        log(f"  timed {bundle.name}/{part} in ONNX Runtime with {threads} thread(s), {len(fns)} files interleaved")
    return rows


def format_table(rows: List[dict]) -> str:
    head = ("model", "part", "runtime", "variant", "thr", "p", "bb MACs cut", "pred. lat. cut", "MACs ratio",
            "dense ms", "fact ms", "speed-up", "/MACs ratio", "s-up (min)")
    lines = []
    for r in rows:
        pred = r["predicted_latency_cut"]
        lines.append((r["model"], r["part"], r["runtime"], r["variant"], str(r["threads"]), f"{r['ratio_p']:.4g}",
                      f"{r['backbone_macs_cut']:.1%}", "-" if pred is None else f"{pred:.1%}",
                      f"{r['macs_ratio']:.2f}x", f"{r['dense_ms']:.1f}", f"{r['factorised_ms']:.1f}",
                      f"{r['speedup']:.2f}x", f"{r['speedup_over_macs_ratio']:.2f}", f"{r['speedup_min']:.2f}x"))
    return text_table(head, lines)


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
    p.add_argument("--no-deploy", dest="deploy", action="store_false",
                   help="time the models as trained instead of in the deploy path's inference form (BatchNorm folded "
                        "into the convs, channels_last on CPU; both checked in float64), which is the default")
    p.add_argument("--rank-multiple", type=int, nargs="+", default=[1],
                   help="round ranks down to multiples of these (one variant per value and target)")
    p.add_argument("--latency-cuts", type=float, nargs="+", default=None,
                   help="also plans that cut the measured per-layer latency by these fractions (latency table "
                        "measured here, cached in --latency-table)")
    p.add_argument("--latency-table", default=None, help="cache file of the per-layer latency table (measured at the "
                   "first --threads count)")
    p.add_argument("--onnx", action="store_true", help="also export each timed part (--parts) to ONNX (checked "
                   "against PyTorch in ONNX Runtime) and time it in ONNX Runtime")
    p.add_argument("--align-ranks", type=int, nargs="+", default=[16], metavar="N",
                   help="ONNX Runtime rows: factorised ranks zero-padded to multiples of N in the exported graph, as "
                        "`lrpet-dense export` does with its default 16 (1: unpadded; one set of rows per value); the "
                        "MACs ratio stays the plan's, the padded MACs are in the JSON rows (macs_factorised_exported)")
    p.add_argument("--stages", action="store_true", help="also print each backbone stage's time and conv MACs, "
                   "dense vs factorised (forward hooks, deploy form)")
    p.add_argument("--compile", action="store_true", help="also time the backbones under torch.compile (inductor, "
                   "freezing on: prepacked weights, fused conv epilogues)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (CUDA events time each call)")
    p.add_argument("--fp16", action="store_true", help="on CUDA: autocast to float16")
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
    if any(a < 1 for a in args.align_ranks):
        p.error("--align-ranks takes integers >= 1")
    hw = (args.size[0], args.size[-1])
    base = ([{"ratio": r} for r in args.ratios] if args.ratios else
            [{"target_macs_cut": c} for c in (args.cuts or [0.3, 0.5])])
    base += [{"target_latency_cut": c, "latency_table": args.latency_table} for c in (args.latency_cuts or [])]
    targets = [dict(t, rank_multiple=m) for t in base for m in args.rank_multiple]
    logging.basicConfig(level=logging.WARNING)
    log = lambda s: print(s, flush=True)  # noqa: E731
    threads_list = args.threads or [torch.get_num_threads()]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    log(f"torch {torch.__version__}, {cpu_name()}, {machine}, input {hw[0]}x{hw[1]}, repeat {args.repeat}, "
        f"{'channels_last' if args.channels_last else 'contiguous (NCHW)'}, load average {load}")
    rows, unreached = [], []
    for name in args.models:
        bundle = DetBundle(hw, args.proposals) if name == "det" else SegBundle(hw)
        log(f"{bundle.title}: building factorised variants")
        bundle.dense_counts = bundle.count(bundle.dense)
        if args.device != "cpu":
            bundle.dense.to(args.device)
            bundle.image = bundle.image.to(args.device)
        if args.deploy:
            bundle.deploy_(bundle.dense)
        own = [dict(t, latency_table=_per_model(t["latency_table"], name)) if t.get("latency_table") else t
               for t in targets]  # one table per model (a table holds one model's layers)
        default_threads = torch.get_num_threads()
        if any(t.get("target_latency_cut") for t in own):
            # the per-layer latency table is measured while planning: at the (first) thread count timed
            torch.set_num_threads(threads_list[0])
        try:
            variants = build_variants(bundle, own, log, args.stock_1x1, args.deploy, unreached)
        finally:
            torch.set_num_threads(default_threads)
        for threads in threads_list:
            torch.set_num_threads(threads)
            rows += run_bundle(bundle, variants, threads, args, log)
        del bundle, variants
    log("")
    log(format_table(rows))
    for u in unreached:
        log(f"{u['model']} {u['target']}: not reachable here: {u['reason']}")
    log("speed-up = median dense wall time / median factorised wall time; '/MACs ratio' = speed-up / MACs ratio "
        "(goal: >= 0.9 for the backbone, >= 0.85 for the whole model); s-up (min): from the minimum wall times; "
        "s-up (CPU): from process CPU time.")
    if args.onnx and any(a > 1 for a in args.align_ranks):
        log("onnxruntime padN: factorised ranks zero-padded to multiples of N in the exported files, as `lrpet-dense "
            "export` writes them (exact; default N=16); the MACs ratio is the plan's (the padded MACs: "
            "macs_factorised_exported in the JSON).")
    result = {"torch": torch.__version__, "machine": machine, "load_average_at_start": load, "input_hw": list(hw),
              "repeat": args.repeat, "channels_last": args.channels_last, "deploy": args.deploy, "device": args.device,
              "fp16": args.fp16, "cpu": cpu_name(),
              "onednn_1x1_everywhere": args.onednn_1x1_everywhere, "proposals": args.proposals,
              "onnx_align_ranks": args.align_ranks if args.onnx else None, "rows": rows,
              "unreached_targets": unreached}
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
