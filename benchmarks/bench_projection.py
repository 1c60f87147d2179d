"""Time one LRPET projection of all ResNet-50 conv layers: fast core vs per-layer exact SVD.

Prints both timings (best of ``--repeat`` alternating runs), their ratio, and the worst relative Frobenius error of
the core's result against a float64 exact-SVD reference on every layer.

    python benchmarks/bench_projection.py [--ratio 0.5] [--repeat 3] [--threads N] [--device cpu|cuda] [--json PATH]

Weights are torchvision's ResNet-50 at its default (random, seeded) initialisation: the real
shapes (53 conv matrices, 23.5 M parameters). The core is timed as the hooks call it
(``compute_layer_projections``, what ``project_`` runs, on the model's ``(name, conv, bn)`` pairs: all layers, computed
without being written). No BN rectification (pass ``--bnr`` for random BN statistics, giving a
BN scale in [0.5, 1.5) per channel).
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torchvision

from _common import save_json  # benchmarks/_common.py
from lrpet_dense.core import ConvBN, LRPETConfig, rank_from_ratio
from lrpet_dense.core.projection import bn_scale, compute_layer_projections


def exact_lrpet(M: torch.Tensor, k: int, a=None, ridge=1e-5) -> torch.Tensor:
    """The textbook projection: full SVD of the (folded) matrix, keep top k, energy transfer."""
    if a is not None:
        M = M * a[:, None]
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    alpha = torch.sqrt((S * S).sum() / (S[:k] * S[:k]).sum())
    out = (U[:, :k] * (S[:k] * alpha)) @ Vh[:k]
    if a is not None:
        out = out * (a / (a * a + ridge))[:, None]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bnr", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = torchvision.models.resnet50().to(dev)
    modules = dict(model.named_modules())
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Conv2d):
            continue
        bn = None
        if args.bnr:  # torchvision pairs convN/bnN, downsample.0/downsample.1
            bn = modules[name[:-1] + "1" if name.endswith("downsample.0") else name.replace("conv", "bn")]
            with torch.no_grad():
                bn.weight.copy_(torch.rand(bn.num_features) + 0.5)
                bn.running_var.fill_(1.0 - bn.eps)
        layers.append(ConvBN(name, m, bn))
    weights = [l.conv.weight.detach() for l in layers]
    ranks = [rank_from_ratio(min(w.shape[0], w[0].numel()), args.ratio) for w in weights]
    plan = {l.name: k for l, k in zip(layers, ranks)}
    scales = [None if l.bn is None else bn_scale(l.bn).float() for l in layers]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run_exact():
        return [exact_lrpet(w.reshape(w.shape[0], -1), k, a) for w, k, a in zip(weights, ranks, scales)]

    def run_fast():
        return [new for _, new, _ in compute_layer_projections(layers, plan, LRPETConfig())]

    # Warm up both, then alternate them so that load changes on the machine hit both alike.
    run_exact(); run_fast(); sync()
    exact_s = fast_s = math.inf
    for _ in range(args.repeat):
        t0 = time.perf_counter(); run_exact(); sync()
        exact_s = min(exact_s, time.perf_counter() - t0)
        t0 = time.perf_counter(); run_fast(); sync()
        fast_s = min(fast_s, time.perf_counter() - t0)
    fast = run_fast()
    max_err = 0.0
    for w, k, a, f in zip(weights, ranks, scales, fast):
        ref = exact_lrpet(w.reshape(w.shape[0], -1).double(), k, None if a is None else a.double())
        err = (f.reshape(ref.shape).double() - ref).norm() / ref.norm()
        max_err = max(max_err, err.item())
    res = {"exact_s": exact_s, "fast_s": fast_s, "speedup": exact_s / fast_s, "max_rel_err": max_err,
           "layers": len(weights)}
    params = sum(w.numel() for w in weights)
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"ResNet-50 convs: {len(weights)} layers, {params / 1e6:.1f} M params, p={args.ratio}, "
          f"BNR={'on' if args.bnr else 'off'}, device {dev} ({machine}), torch {torch.__version__}")
    print(f"exact per-layer SVD : {exact_s:.3f} s")
    print(f"lrpet_dense core    : {fast_s:.3f} s")
    print(f"speed-up            : {res['speedup']:.2f}x")
    print(f"worst rel. error    : {max_err:.2e} (Frobenius, vs float64 exact SVD, per layer)")
    save_json(args.json, res)


if __name__ == "__main__":
    main()
