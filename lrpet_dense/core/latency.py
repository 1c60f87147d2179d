"""Measured per-layer latency, for plans that cut latency instead of MACs.

MACs are not time: a factorised layer whose rank is not a multiple of the vector width, a strided 1x1
conv, or a layer too small for the kernels to reach their peak, gains less than its MACs, or nothing.
:func:`measure_latency_table` times, once and on the device at hand, every selected conv as it is
(dense) and as the factorised pair at a set of candidate ranks, with the layer's own input size, in the
inference layout (channels_last on CPU). The table is plain data, cached in a JSON file (keyed by the
layer shapes, the device, the thread count and the torch version, so a stale table is not reused).

:func:`~lrpet_dense.core.build_rank_plan` uses it when ``target_latency_cut`` is set: it solves the one
ratio ``p`` whose plan removes that fraction of the selected layers' measured dense latency, taking
for each layer the factorised form only where it is measured faster (the others stay dense, not
projected). Between candidate ranks the latency is interpolated linearly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .deploy import to_inference_layout_
from .factorize import FactorizedConv2d
from .macs import full_rank
from .projection import ConvBN

__all__ = ["LatencyTable", "measure_latency_table"]

logger = logging.getLogger(__name__)


@dataclass
class LatencyTable:
    """Measured latency (ms, median) of each layer dense and factorised at candidate ranks.

    Attributes:
        layers: ``{name: {"dense": ms, "ranks": [k, ...], "factorized": [ms, ...]}}``.
        meta: where and how it was measured (device, threads, repeats, torch, CPU).
    """

    layers: Dict[str, Dict[str, object]]
    meta: Dict[str, object] = field(default_factory=dict)

    def dense_ms(self, name: str) -> float:
        return float(self.layers[name]["dense"])

    def factorized_ms(self, name: str, rank: int) -> float:
        """Latency of the factorised pair at ``rank``, interpolated between the measured ranks."""
        ranks, times = self.layers[name]["ranks"], self.layers[name]["factorized"]
        if rank <= ranks[0]:
            return float(times[0])
        for (k0, t0), (k1, t1) in zip(zip(ranks, times), zip(ranks[1:], times[1:])):
            if rank <= k1:
                return float(t0 + (t1 - t0) * (rank - k0) / max(k1 - k0, 1))
        return float(times[-1])

    def to_dict(self) -> dict:
        return {"version": 1, "meta": self.meta, "layers": self.layers}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LatencyTable":
        if data.get("version") != 1 or "layers" not in data:
            raise ValueError("not an lrpet_dense latency table (version 1)")
        return cls(dict(data["layers"]), dict(data.get("meta") or {}))


def _candidate_ranks(full: int, step: int) -> List[int]:
    ranks = list(range(step, full, step)) or [max(1, full // 2)]
    return sorted(set([1, *ranks, full]))


def _time(fn, x: torch.Tensor, repeats: int, device: torch.device) -> float:
    with torch.no_grad():
        for _ in range(2):
            fn(x)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


#: how a table is measured; a cached table measured another way is measured again
_METHOD = "v2: dense convs in the deploy path's inference layout (1x1 on the oneDNN kernel)"


def _key(layers: Sequence[Tuple[ConvBN, Tuple[int, int]]], device: torch.device, step: int, repeats: int) -> str:
    parts = [f"{l.name}:{tuple(l.conv.weight.shape)}:{hw}:{l.conv.stride}:{l.conv.padding}:{l.conv.dilation}"
             for l, hw in layers]
    parts += [str(device), str(torch.get_num_threads()), torch.__version__, platform.processor(), str(step), str(repeats),
              _METHOD]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def measure_latency_table(layers: Sequence[ConvBN], in_sizes: Mapping[str, Tuple[int, int]], *, step: int = 16,
                          repeats: int = 10, cache: Optional[str] = None) -> LatencyTable:
    """Time every conv of ``layers`` dense and factorised (random weights) at ranks ``step, 2*step, ...``.

    Args:
        layers: ``(name, conv, bn)`` triples (only the convs are timed).
        in_sizes: ``{name: (H, W)}`` of each conv's input (e.g. from a dummy forward).
        step: candidate ranks are multiples of this (and 1 and the full rank). Defaults to 16.
        repeats: timed runs per measurement (median). Defaults to 10.
        cache: a JSON file: read when it holds a table measured for these layers on this device,
            thread count and torch version; written otherwise. Defaults to None (no cache).

    Returns:
        The :class:`LatencyTable`.
    """
    todo = [(l, tuple(in_sizes[l.name])) for l in layers if l.name in in_sizes]
    device = next(iter(todo))[0].conv.weight.device if todo else torch.device("cpu")
    key = _key(todo, device, step, repeats)
    if cache and os.path.isfile(cache):
        with open(cache) as f:
            data = json.load(f)
        if data.get("meta", {}).get("key") == key:
            logger.info("latency table: reusing %s", cache)
            return LatencyTable.from_dict(data)
        logger.info("latency table %s was measured for other layers or another device/setting: measuring again",
                    cache)
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    out: Dict[str, Dict[str, object]] = {}
    t0 = time.time()
    for layer, hw in todo:
        conv = layer.conv
        x = torch.randn(1, conv.in_channels, *hw, device=device).contiguous(memory_format=fmt)
        dense = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, bias=conv.bias is not None).to(device).eval()
        to_inference_layout_(dense)  # as the deploy path runs a conv left dense (1x1: the oneDNN kernel on CPU)
        ranks = _candidate_ranks(full_rank(conv.weight.shape), step)
        times = []
        for k in ranks:
            pair = FactorizedConv2d.empty_like(dense, k).eval().to(memory_format=fmt)
            for p in pair.parameters():
                nn.init.normal_(p, std=0.01)
            times.append(_time(pair, x, repeats, device))
        out[layer.name] = {"dense": _time(dense, x, repeats, device), "ranks": ranks, "factorized": times}
    meta = {"key": key, "device": str(device), "threads": torch.get_num_threads(), "repeats": repeats,
            "torch": torch.__version__, "cpu": platform.processor(), "layout": "channels_last" if fmt is
            torch.channels_last else "contiguous", "seconds": round(time.time() - t0, 1)}
    table = LatencyTable(out, meta)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        with open(cache, "w") as f:
            json.dump(table.to_dict(), f)
    logger.info("latency table: %d layers measured in %.1fs on %s", len(out), meta["seconds"], device)
    return table
