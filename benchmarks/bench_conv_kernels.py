"""Throughput of ResNet-50's convs dense vs factorised, conv by conv, in every CPU kernel at hand.

A factorised layer replaces one conv by two thinner ones (``Cin -> k`` with the layer's kernel, then a
1x1 ``k -> Cout``). Its speed-up can reach its MACs ratio only if the thin convs run at the dense
conv's throughput (GFLOP/s). This script measures that, for the shapes of ResNet-50's res3 and res4
blocks (or any ``--stage``), in isolation, on one thread by default, through each kernel PyTorch
offers on CPU and in ONNX Runtime:

* ``onednn``: ``torch.mkldnn_convolution`` on channels_last (what the deploy path runs);
* ``torch-cl`` / ``torch-nchw``: ``F.conv2d`` on channels_last / contiguous inputs (PyTorch's own choice);
* ``ort``: the conv (or the pair) exported to ONNX and run in ONNX Runtime (``--ort``).

For each layer and kernel it prints the dense and factorised times, the speed-up, the MACs ratio and
their quotient (the part of the MACs cut the kernel turns into time), and the GFLOP/s of each.

    python benchmarks/bench_conv_kernels.py [--stage 48 512 128 --stage 24 1024 256] [--keep 0.25]
        [--threads 1] [--repeat 30] [--ort] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import cpu_name, save_json, text_table  # noqa: E402  (benchmarks/_common.py)
from lrpet_dense.core.factorize import FactorizedConv2d  # noqa: E402
from lrpet_dense.core.macs import conv_macs  # noqa: E402


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Median ms of ``repeat`` calls after 5 warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _convs(module: nn.Module) -> List[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _runner(module: nn.Module, x: torch.Tensor, kernel: str, tmp: str) -> Callable[[], object]:
    """A call of ``module`` (one conv or a factorised pair) on ``x`` through ``kernel``."""
    convs = _convs(module)
    if kernel == "onednn":
        xc = x.contiguous(memory_format=torch.channels_last)
        ws = [c.weight.contiguous(memory_format=torch.channels_last) for c in convs]

        def run():
            y = xc
            for c, w in zip(convs, ws):
                y = torch.mkldnn_convolution(y, w, c.bias, c.padding, c.stride, c.dilation, 1)
            return y
        return run
    if kernel in ("torch-cl", "torch-nchw"):
        xc = x.contiguous(memory_format=torch.channels_last) if kernel == "torch-cl" else x.contiguous()

        def run():
            y = xc
            for c in convs:
                y = F.conv2d(y, c.weight, c.bias, c.stride, c.padding, c.dilation)
            return y
        return run
    if kernel == "ort":
        from lrpet_dense.core.export import ort_session

        path = os.path.join(tmp, f"m{id(module)}.onnx")
        with torch.no_grad():
            torch.onnx.export(module, (x,), path, opset_version=17, dynamo=False, input_names=["x"])
        session = ort_session(path, torch.get_num_threads())
        feeds = {"x": x.numpy()}
        return lambda: session.run(None, feeds)
    raise ValueError(f"unknown kernel {kernel!r}")


def _macs(conv: nn.Conv2d, hw: int) -> int:
    out = (hw + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    return conv_macs(tuple(conv.weight.shape), (out, out))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, nargs=3, action="append", metavar=("HW", "COUT", "WIDTH"),
                   help="a bottleneck stage: input size, block output channels, bottleneck width "
                        "(default: ResNet-50 res3 and res4 at a 384 px input: 48 512 128, 24 1024 256)")
    p.add_argument("--keep", type=float, default=0.25,
                   help="rank of each factorised conv as a fraction of its width (default 0.25: about a 3x MACs cut)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--ort", action="store_true", help="also time in ONNX Runtime")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kernels = ["onednn", "torch-cl", "torch-nchw"] + (["ort"] if args.ort else [])
    stages = args.stage or [[48, 512, 128], [24, 1024, 256]]
    rows = []
    cpu = cpu_name()
    print(f"torch {torch.__version__}, {cpu}, {args.threads} thread(s), rank = {args.keep:g} x width")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for hw, cout, width in stages:
            k = max(1, round(width * args.keep))
            layers = {f"{hw}px 1x1 {cout}->{width}": nn.Conv2d(cout, width, 1),
                      f"{hw}px 3x3 {width}->{width}": nn.Conv2d(width, width, 3, padding=1),
                      f"{hw}px 1x1 {width}->{cout}": nn.Conv2d(width, cout, 1)}
            for name, dense in layers.items():
                dense.eval()
                pair = FactorizedConv2d.empty_like(dense, k).eval()
                for q in pair.parameters():
                    nn.init.normal_(q, std=0.02)
                x = torch.randn(1, dense.in_channels, hw, hw)
                md, mf = _macs(dense, hw), sum(_macs(c, hw) for c in _convs(pair))
                for kernel in kernels:
                    td = _time(_runner(dense, x, kernel, tmp), args.repeat)
                    tf = _time(_runner(pair, x, kernel, tmp), args.repeat)
                    rows.append({"layer": name, "rank": k, "kernel": kernel, "dense_ms": td, "factorised_ms": tf,
                                 "macs_ratio": md / mf, "speedup": td / tf, "dense_gflops": 2 * md / td / 1e6,
                                 "factorised_gflops": 2 * mf / tf / 1e6})
    head = ("layer", "k", "kernel", "dense ms", "fact ms", "speed-up", "MACs ratio", "/MACs ratio",
            "dense GFLOP/s", "fact GFLOP/s")
    lines = [(r["layer"], str(r["rank"]), r["kernel"], f"{r['dense_ms']:.3f}", f"{r['factorised_ms']:.3f}",
              f"{r['speedup']:.2f}x", f"{r['macs_ratio']:.2f}x", f"{r['speedup'] / r['macs_ratio']:.2f}",
              f"{r['dense_gflops']:.0f}", f"{r['factorised_gflops']:.0f}") for r in rows]
    print(text_table(head, lines))
    result = {"torch": torch.__version__, "cpu": cpu, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "threads": args.threads, "keep": args.keep, "rows": rows}
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
