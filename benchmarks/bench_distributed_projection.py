"""Time one LRPET projection of all ResNet-50 convs in 1 process vs W processes (gloo, CPU).

The W-process run uses :func:`~lrpet_dense.core.project_` in a process group: each rank projects
its share of the layers and the new weights are broadcast, so every rank ends with the same
weights. Each of the W processes gets ``--threads-per-rank t`` torch threads (a DDP rank has its
own device). Timed, best of ``--repeat`` after a warm-up:

- 1 process with ``t`` threads: what every rank did when each projected all layers itself;
- 1 process with ``W*t`` threads: the same CPU budget as the W processes, in one process;
- W processes with ``t`` threads each, communication included (the slowest rank's time).

Also prints the ratios, the time of broadcasting all the weights once (the communication floor),
the CPU time of one process vs the busiest rank (the work per rank, which a machine shared with
other jobs does not inflate as it does wall time), and the max abs difference between the 1- and
W-process results (0: each layer is computed with one intra-op thread whatever the thread count,
so the results are bit-identical).

    python benchmarks/bench_distributed_projection.py [--world 2] [--threads-per-rank 1] [--ratio 0.5]
        [--repeat 3] [--json PATH]

Weights: torchvision's ResNet-50 at its default (random, seeded) initialisation, 53 convs, each
with its BN given random statistics (BN rectification on; ``--no-bnr`` turns it off); the rank
plan comes from :func:`~lrpet_dense.core.build_rank_plan` at ``--ratio``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time

import torch
import torch.distributed as dist
import torchvision

from _common import save_json  # benchmarks/_common.py
from lrpet_dense.core import ConvBN, LRPETConfig, build_rank_plan, project_
from lrpet_dense.core.selection import layer_specs


def resnet50_layers(bnr: bool):
    """ResNet-50 (seed 0) and its ``(name, conv, bn)`` pairs, BNs with random statistics."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    modules = dict(model.named_modules())
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Conv2d):
            continue
        # torchvision pairs convN/bnN and downsample.0/downsample.1
        bn = modules[name[:-1] + "1" if name.endswith("downsample.0") else name.replace("conv", "bn")]
        with torch.no_grad():
            bn.weight.copy_(torch.rand(bn.num_features) + 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)
        layers.append(ConvBN(name, m, bn if bnr else None))
    return model, layers


def _time_projection(layers, plan, repeat: int, barrier=lambda: None) -> tuple:
    """Best wall and CPU (this process) time of ``repeat`` projections after a warm-up, and the result.

    Each projection starts from the original weights. The CPU time is the work one process does,
    which a shared machine does not inflate the way it inflates wall time.
    """
    original = [l.conv.weight.detach().clone() for l in layers]

    def restore():
        with torch.no_grad():
            for l, w in zip(layers, original):
                l.conv.weight.copy_(w)

    best = best_cpu = math.inf
    for i in range(repeat + 1):
        restore()
        barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        project_(layers, plan)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i > 0:  # the first run is a warm-up
            best, best_cpu = min(best, dt), min(best_cpu, dc)
    return best, best_cpu, [l.conv.weight.detach().clone() for l in layers]


def _worker(rank: int, world: int, threads: int, ratio: float, repeat: int, bnr: bool, tmp: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        _, layers = resnet50_layers(bnr)
        plan = build_rank_plan(layer_specs(layers), LRPETConfig(ratio=ratio))
        best, cpu, weights = _time_projection(layers, plan, repeat, dist.barrier)
        # The communication floor: every weight broadcast once, in W equal flat buffers.
        numel = sum(l.conv.weight.numel() for l in layers)
        flat = torch.zeros(-(-numel // world))
        bcast = math.inf
        for _ in range(repeat):
            dist.barrier()
            t0 = time.perf_counter()
            for src in range(world):
                dist.broadcast(flat, src=src)
            bcast = min(bcast, time.perf_counter() - t0)
        # The slowest rank sets the pace.
        t = torch.tensor([best, bcast, cpu], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rank == 0:
            torch.save({"seconds": t[0].item(), "broadcast_s": t[1].item(), "cpu_s": t[2].item(), "weights": weights},
                       f"{tmp}/result.pt")
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="processes of the distributed run (>= 2)")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-bnr", dest="bnr", action="store_false", help="no BN rectification")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error(f"--world must be >= 2, got {args.world}")
    if args.threads_per_rank < 1:
        parser.error(f"--threads-per-rank must be >= 1, got {args.threads_per_rank}")
    per_rank = args.threads_per_rank
    total = per_rank * args.world

    _, layers = resnet50_layers(args.bnr)
    plan = build_rank_plan(layer_specs(layers), LRPETConfig(ratio=args.ratio))
    torch.set_num_threads(per_rank)
    single_s, single_cpu, single_w = _time_projection(layers, plan, args.repeat)
    torch.set_num_threads(total)
    single_all_s, _, _ = _time_projection(layers, plan, args.repeat)

    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(args.world, per_rank, args.ratio, args.repeat, args.bnr, tmp),
                                    nprocs=args.world, join=True)
        res = torch.load(f"{tmp}/result.pt", weights_only=True)
    dist_s = res["seconds"]
    diff = max((a - b).abs().max().item() for a, b in zip(single_w, res["weights"]))
    out = {"layers": len(layers), "ratio": args.ratio, "bnr": args.bnr, "world": args.world,
           "threads_per_rank": per_rank, "single_s": single_s, "single_all_threads_s": single_all_s,
           "distributed_s": dist_s, "broadcast_s": res["broadcast_s"], "speedup": single_s / dist_s,
           "speedup_same_cpus": single_all_s / dist_s, "single_cpu_s": single_cpu, "distributed_cpu_s_max_rank":
           res["cpu_s"], "cpu_ratio": single_cpu / res["cpu_s"], "max_abs_diff": diff, "cpu_count": os.cpu_count(),
           "torch": torch.__version__}
    params = sum(l.conv.weight.numel() for l in layers)
    print(f"ResNet-50 convs: {len(layers)} layers, {params / 1e6:.1f} M params, p={args.ratio}, "
          f"BNR={'on' if args.bnr else 'off'}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    w = args.world
    print(f"1 process,  {per_rank} thread(s)                : {single_s:.3f} s")
    print(f"1 process,  {total} thread(s)                : {single_all_s:.3f} s")
    print(f"{w} processes, {per_rank} thread(s) each (gloo)  : {dist_s:.3f} s "
          f"(of which >= {res['broadcast_s']:.3f} s broadcasting the weights)")
    print(f"speed-up vs 1 process, {per_rank} thread(s)     : {out['speedup']:.2f}x")
    print(f"speed-up vs 1 process, {total} thread(s)     : {out['speedup_same_cpus']:.2f}x")
    print(f"CPU time per process, 1 vs {w} processes : {single_cpu:.3f} s vs {res['cpu_s']:.3f} s (busiest rank), "
          f"{out['cpu_ratio']:.2f}x less")
    print(f"max abs diff, 1 vs {w} processes         : {diff:.3g}")
    save_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
