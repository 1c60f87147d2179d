"""Projecting a model's layers in place: :func:`project_`, shared over the ranks of a distributed job.

:func:`project_` computes every planned layer's new weight (:mod:`lrpet_dense.core.projection`, the
single-process maths) and writes them all only when every layer succeeded. Under ``torch.distributed``
the work is shared and every rank ends bit-identical. Projecting independently on every rank is not safe: BN running statistics differ across ranks
(both detectron2 and mmengine wrap with ``broadcast_buffers=False``), and eigensolvers need not
give bit-identical results on different devices. the distributed path instead

1. assigns each planned layer to one rank, balancing the cost (greedy, largest first, by
   ``n*d*m + m^3`` for an ``n x d`` matrix of rank ``m``), so projection time falls with the
   number of ranks;
2. gives every owner rank 0's BN statistics for BN rectification (rank 0's model is the one
   checkpoints are written from, and the result then does not depend on who owns a layer);
3. lets each owner compute the new weights of its layers from its own copy of the weights (DDP
   keeps those identical on every rank), writing nothing;
4. agrees on failure: an ``all_reduce`` of a failure flag, so if any rank failed every rank raises
   :class:`DistributedProjectionError` naming the layer, and no weight changes on any rank;
5. broadcasts each owner's new weights (one flat buffer per owner) and the per-layer stats, then
   copies them in place on every rank (same ``Parameter`` objects, so optimizers and DDP keep
   tracking them).

:func:`project_` takes this path by itself in a distributed job.

Example (in every process of a job started with ``torchrun`` or detectron2's ``launch``)::

    from lrpet_dense.core import project_
    stats = project_(layers, plan, config)  # same weights and stats on every rank
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .config import LRPETConfig
from .projection import ConvBN, LayerStats, compute_layer_projections, layer_cost, plan_ranks, write_projections_
from .rank import RankPlan

__all__ = ["project_", "DistributedProjectionError"]

logger = logging.getLogger(__name__)


class DistributedProjectionError(RuntimeError):
    """A distributed projection failed on some rank; raised on every rank, and no weight was changed.

    Attributes:
        failures: ``{rank: message}`` of every rank that failed.
        layers: names of the failing layers, as far as they are known.
    """

    def __init__(self, failures: Dict[int, str], layers: Sequence[str]):
        self.failures = dict(failures)
        self.layers = list(layers)
        if len(self.failures) > 1 and len(set(self.failures.values())) == 1:
            lines = f"all ranks: {next(iter(self.failures.values()))}"
        else:
            lines = "; ".join(f"rank {r}: {m}" for r, m in sorted(self.failures.items()))
        super().__init__(f"LRPET projection failed, no layer was changed on any rank ({lines})")


class _BNStats(NamedTuple):
    """Stand-in for a BatchNorm holding rank 0's statistics (what the projection's BN scale reads)."""

    running_var: Tensor
    weight: Optional[Tensor]
    eps: float


def assign_layers(costs: Sequence[int], world_size: int) -> List[int]:
    """Owner rank of each layer: greedy longest-processing-time, ties to the lower rank.

    Deterministic, so every rank computes the same assignment without communicating.

    Args:
        costs: per-layer cost (e.g. :func:`layer_cost`).
        world_size: number of ranks (>= 1).

    Returns:
        ``owners[i]`` in ``[0, world_size)`` for each layer ``i``.

    Example:
        >>> assign_layers([5, 4, 3, 3], 2)
        [0, 1, 1, 0]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    owners = [0] * len(costs)
    heap = [(0, r) for r in range(world_size)]  # (load, rank)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


def _is_distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _comm_device(group) -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and others) take CPU tensors.
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _global(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _agree(failure: Optional[str], failed_layer: Optional[str], signature: int, device: torch.device,
           group) -> None:
    """Raise :class:`DistributedProjectionError` on every rank if any rank failed or the ranks disagree."""
    t = torch.tensor([1 if failure else 0, signature, -signature], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    any_failed, mismatch = bool(t[0].item()), failure is None and t[1].item() != -t[2].item()
    if not (any_failed or mismatch):
        return
    if mismatch:  # structure disagrees, but no rank failed: say so on every rank
        failure = ("the ranks do not project the same layers (different models or plans on different ranks); "
                   "build the model and the plan identically on every rank")
    everyone: List[Optional[Tuple[str, Optional[str]]]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (failure, failed_layer) if failure else None, group=group)
    failures = {r: f[0] for r, f in enumerate(everyone) if f is not None}
    layers = [f[1] for f in everyone if f is not None and f[1]]
    raise DistributedProjectionError(failures, layers)


def _signature(names: Sequence[str], shapes: Sequence[Tuple[int, ...]], ranks: Sequence[int]) -> int:
    """A cheap fingerprint of what is projected, equal on every rank when the models and plans agree."""
    sig = 0
    for i, (name, shape, k) in enumerate(zip(names, shapes, ranks)):
        numel = 1
        for s in shape:
            numel *= int(s)
        sig = (sig * 1_000_003 + (i + 1) * (numel * 131 + k) + sum(name.encode())) % (2 ** 61 - 1)
    return sig


def _named_layer(exc: BaseException, names: Sequence[str]) -> Optional[str]:
    text = str(exc)
    return next((n for n in names if repr(n) in text or f'"{n}"' in text), None)


def project_(
    layers: Sequence[ConvBN],
    plan: Union[RankPlan, Mapping[str, int]],
    config: Optional[LRPETConfig] = None,
    *,
    distributed: Optional[bool] = None,
    group=None,
) -> List[LayerStats]:
    """Project every planned layer in place, atomically; shared over the ranks of a distributed job.

    All new weights are computed first (on CPU, several layers at a time); they are written (into
    the same ``Parameter`` objects, so optimizers and DDP keep tracking them) only when every layer
    succeeded. An error on any layer leaves every layer unchanged and names the layer.

    In a distributed job (an initialised process group with more than one process) every rank must
    call this with the same layers and plan: each layer is projected by one owner rank, with rank
    0's BN statistics, and broadcast, so all ranks end bit-identical (see this module's
    docs); a failure on any rank changes nothing on any rank.

    Args:
        layers: ``(name, conv, bn)`` triples from a framework adapter; layers not in ``plan`` are skipped.
        plan: a :class:`RankPlan` or ``{name: rank}``. Every planned name must be in ``layers``.
        config: ``energy_transfer``, ``bn_rectification``, ``ridge`` and ``residual`` come from it.
            Defaults to ``LRPETConfig()``.
        distributed: share the work over the process group. Defaults to None: when one is
            initialised with more than one process.
        group: the process group. Defaults to None (the default group).

    Returns:
        One :class:`LayerStats` per projected layer, in ``layers`` order (the same on every rank).
    """
    config = config or LRPETConfig()
    if distributed is None or distributed:
        if _is_distributed(group):
            return _project_distributed(layers, plan, config, group)
        if distributed:
            raise ValueError("project_(distributed=True) needs an initialised process group with more than one process")
    results = compute_layer_projections(layers, plan, config)
    write_projections_(results)
    return [s for _, _, s in results]


def _project_distributed(layers: Sequence[ConvBN], plan: Union[RankPlan, Mapping[str, int]], config: LRPETConfig,
                         group=None) -> List[LayerStats]:
    """Project every planned layer in place on every rank, sharing the work; bit-identical results.

    Must be called by every rank of ``group`` with the same layers and plan (a collective); see the
    module docs. Reached through :func:`~lrpet_dense.core.project_`.

    Raises:
        DistributedProjectionError: on every rank, when any rank failed; nothing was written.
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)
    device = _comm_device(group)
    todo, shapes, signature, failure = _planned_layers(layers, plan)
    _agree(failure, None, signature, device, group)  # agreed even here: no rank is left waiting
    if not todo:
        return []
    owners = assign_layers([layer_cost(s) for s in shapes], world)
    bn_for = _rank0_bn_statistics(todo, config, device, group)
    mine = [i for i, o in enumerate(owners) if o == me]
    results, failure, failed_layer = _compute_mine(todo, mine, bn_for, plan, config, me)
    _agree(failure, failed_layer, signature, device, group)
    received, stats = _exchange(todo, owners, mine, results, device, group)
    with torch.no_grad():  # everything has arrived: now write
        for i, (layer, _) in enumerate(todo):
            w = layer.conv.weight
            w.copy_(received[i].view(w.shape))
    out = []
    for i, (layer, k) in enumerate(todo):
        w = layer.conv.weight
        out.append(LayerStats(layer.name, k, min(w.shape[0], w[0].numel()), float(stats[i, 0]), float(stats[i, 1])))
    return out


def _planned_layers(layers, plan):
    """``(todo, shapes, signature, failure)``: the planned layers with their ranks, cheap and identical on
    every rank; an error becomes ``failure`` so that it reaches the other ranks."""
    try:
        ranks = plan_ranks(layers, plan)
        todo = [(l, ranks[l.name]) for l in layers if l.name in ranks]
        shapes = [tuple(l.conv.weight.shape) for l, _ in todo]
        return todo, shapes, _signature([l.name for l, _ in todo], shapes, [k for _, k in todo]), None
    except Exception as e:  # noqa: BLE001 - every error must reach the other ranks
        return [], [], 0, f"{type(e).__name__}: {e}"


def _rank0_bn_statistics(todo, config: LRPETConfig, device, group) -> Dict[int, object]:
    """Rank 0's BN statistics (running_var, gamma) of every BN-rectified layer, as float64 (exact for
    float16/32). Layers whose norm has no running statistics keep their module; the owner's projection
    reports it."""
    with_stats = [i for i, (l, _) in enumerate(todo)
                  if config.bn_rectification and l.bn is not None and getattr(l.bn, "running_var", None) is not None
                  and hasattr(l.bn, "eps")]
    if not with_stats:
        return {}
    parts = []
    for i in with_stats:
        bn = todo[i][0].bn
        parts.append(bn.running_var.detach().reshape(-1))
        if getattr(bn, "weight", None) is not None:
            parts.append(bn.weight.detach().reshape(-1))
    flat = torch.cat([p.to(device=device, dtype=torch.float64) for p in parts])
    dist.broadcast(flat, src=_global(group, 0), group=group)
    bn_for, offset = {}, 0
    for i in with_stats:
        bn = todo[i][0].bn
        n = bn.running_var.numel()
        var = flat[offset:offset + n].to(bn.running_var.dtype).view_as(bn.running_var)
        offset += n
        gamma = None
        if getattr(bn, "weight", None) is not None:
            gamma = flat[offset:offset + n].to(bn.weight.dtype).view_as(bn.weight)
            offset += n
        bn_for[i] = _BNStats(var, gamma, float(bn.eps))
    return bn_for


def _compute_mine(todo, mine, bn_for, plan, config: LRPETConfig, me: int):
    """This rank's layers' new weights (nothing written): ``(results, failure, failed layer)``."""
    sub_layers = [ConvBN(todo[i][0].name, todo[i][0].conv, bn_for.get(i, todo[i][0].bn)) for i in mine]
    sub_ranks = {todo[i][0].name: todo[i][1] for i in mine}
    sub_plan: Union[RankPlan, Dict[str, int]] = sub_ranks
    if isinstance(plan, RankPlan):  # keeps the per-layer shape check against the plan
        sub_plan = dataclasses.replace(plan, layers={n: plan.layers[n] for n in sub_ranks})
    try:
        return compute_layer_projections(sub_layers, sub_plan, config), None, None
    except Exception as e:  # noqa: BLE001 - every error must reach the other ranks
        names = [l.name for l in sub_layers]
        failed_layer = _named_layer(e, names)
        if failed_layer is None:  # an error that does not say which layer: find it, one layer at a time
            for layer in sub_layers:
                try:
                    compute_layer_projections([layer], {layer.name: sub_ranks[layer.name]}, config)
                except Exception:  # noqa: BLE001
                    failed_layer = layer.name
                    break
        where = f" (layer {failed_layer!r})" if failed_layer and failed_layer not in str(e) else ""
        logger.error("LRPET projection failed on rank %d%s: %s", me, where, e)
        return [], f"{type(e).__name__}{where}: {e}", failed_layer


def _exchange(todo, owners, mine, results, device, group):
    """Broadcast every owner's new weights (one flat buffer per owner and dtype) and the stats."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    new_by_index: Dict[int, Tensor] = {}
    stats = torch.zeros(len(todo), 2, dtype=torch.float64, device=device)
    for i, (_, new, s) in zip(mine, results):
        new_by_index[i] = new
        stats[i, 0], stats[i, 1] = s.energy_kept, s.rel_change
    received: Dict[int, Tensor] = {}
    for owner in range(world):
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for i in (i for i, o in enumerate(owners) if o == owner):
            by_dtype.setdefault(todo[i][0].conv.weight.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            sizes = [todo[i][0].conv.weight.numel() for i in idx]
            if owner == me:
                flat = torch.cat([new_by_index[i].reshape(-1).to(device) for i in idx])
            else:
                flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            dist.broadcast(flat, src=_global(group, owner), group=group)
            for i, chunk in zip(idx, torch.split(flat, sizes)):
                received[i] = chunk
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)  # each row is non-zero on its owner only
    return received, stats.cpu()
