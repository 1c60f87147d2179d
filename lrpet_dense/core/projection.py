"""One LRPET projection: BN rectification, low-rank projection, energy transfer (METHOD.md section 3).

The expensive part is the top-k subspace of each weight. Instead of a full SVD per layer we take
the eigendecomposition of the smaller Gram matrix in float32 and then re-solve, in float64, the
handful of eigenvectors on either side of the rank cut (a Rayleigh-Ritz step on that window). The
cut is the only place where float32 round-off can mix kept and dropped directions, so this gives
float64-reference accuracy (``benchmarks/bench_projection.py`` measures it) at float32 cost.
float64 weights take an all-float64 path.

Example:
    >>> import torch
    >>> from lrpet_dense.core import lrpet_project
    >>> w = torch.randn(64, 32, 3, 3)
    >>> w2 = lrpet_project(w, 16, bn_scale=torch.rand(64) + 0.5)
    >>> torch.linalg.matrix_rank(w2.reshape(64, -1)).item()
    16
"""
from __future__ import annotations

import logging
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .config import LRPETConfig
from .rank import RankPlan

__all__ = ["ConvBN", "LayerStats", "lrpet_project"]  # project_ (in place, shared over ranks): .distributed

logger = logging.getLogger(__name__)

# Half-width of the window of eigenvectors around the rank cut that is re-solved in float64.
_WINDOW = 16


class ConvBN(NamedTuple):
    """A conv to project, with the BatchNorm that follows it (None when there is none)."""

    name: str
    conv: nn.Module
    bn: Optional[nn.Module] = None


@dataclass(frozen=True)
class LayerStats:
    """What one projection did to one layer.

    Attributes:
        name: layer name.
        rank: the rank projected onto.
        full_rank: ``min(n, c*kh*kw)``.
        energy_kept: ``sum_{i<=k} s_i^2 / sum_i s_i^2`` of the (BN-folded) weight, before ET.
        rel_change: ``||W' - W||_F / ||W||_F``.
    """

    name: str
    rank: int
    full_rank: int
    energy_kept: float
    rel_change: float


def bn_scale(bn: nn.Module, name: str = "") -> Tensor:
    """``gamma / sqrt(running_var + eps)`` of a BatchNorm-like module (BN, SyncBN, FrozenBN).

    Uses the running statistics, never batch statistics.
    """
    var = getattr(bn, "running_var", None)
    if var is None or not hasattr(bn, "eps"):
        raise ValueError(f"layer {name!r}: norm {type(bn).__name__} has no running statistics to rectify with")
    scale = torch.rsqrt(var.detach().double() + float(bn.eps))
    gamma = getattr(bn, "weight", None)
    if gamma is not None:
        scale = scale * gamma.detach().double()
    return scale


def _check_finite(t: Tensor, what: str, name: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"layer {name!r}: {what} contains {bad} NaN/Inf value(s); refusing to project it")


class _Scratch:
    """Reusable buffers for the large temporaries of the layers one thread projects.

    A fresh multi-megabyte CPU tensor page-faults on first touch, which is a measurable share of a
    projection (``benchmarks/README.md``); buffers are reused instead. They only grow; none is ever
    returned to the caller.
    """

    def __init__(self) -> None:
        self._bufs: Dict[Tuple[str, torch.dtype, torch.device], Tensor] = {}

    def take(self, slot: str, shape: Sequence[int], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """An uninitialised contiguous tensor of ``shape`` (``like``'s device, ``dtype`` or ``like``'s)."""
        dtype = dtype or like.dtype
        numel = math.prod(shape)
        key = (slot, dtype, like.device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=like.device)
        return buf[:numel].view(*shape)


_local = threading.local()


@contextmanager
def _scratch_scope():
    """Let the projections run by this thread inside the block reuse one :class:`_Scratch`."""
    prev = getattr(_local, "scratch", None)
    _local.scratch = _Scratch()
    try:
        yield
    finally:
        _local.scratch = prev


def _scratch() -> _Scratch:
    """This thread's scratch, or a throw-away one outside :func:`_scratch_scope`."""
    s = getattr(_local, "scratch", None)
    return s if s is not None else _Scratch()


def _sq_norm(t: Tensor, ws: Optional[_Scratch] = None) -> float:
    """Squared Frobenius norm as a Python float, without a float64 copy of ``t``.

    ``sum`` uses cascade summation (relative error ~1e-8 here); float32 ``vector_norm`` does not
    (~1e-3 on a ResNet-50 layer), which would corrupt the energy-transfer factor.
    """
    sq = torch.mul(t, t, out=(ws or _scratch()).take("square", t.shape, t))
    return sq.sum().item()


def _stat_sq_norm(t: Tensor) -> float:
    """Squared Frobenius norm for statistics: one BLAS ``dot`` pass (relative error ~1e-5 in float32)."""
    if t.dtype not in (torch.float32, torch.float64):
        return _sq_norm(t)
    flat = t.reshape(-1)
    return torch.dot(flat, flat).item()


def _gram_upper(M: Tensor, left: bool, ws: _Scratch) -> Tensor:
    """Upper triangle of the smaller Gram matrix (``M M^T`` or ``M^T M``), in row blocks.

    Only the blocks on and above the diagonal are multiplied: 35-45% fewer flops than a full GEMM
    for the large layers. The lower triangle is left unset (``eigh`` reads ``UPLO='U'``).
    """
    A = M if left else M.T
    m = A.shape[0]
    G = ws.take("gram", (m, m), A)
    blocks = 8 if m >= 256 else 1
    step = -(-m // blocks)
    for i in range(0, m, step):
        torch.mm(A[i:i + step], A[i:].T, out=G[i:i + step, i:])
    return G


def _subspace(G: Tensor, k: int, top: bool, ws: _Scratch) -> Tensor:
    """Orthonormal basis of the top-k (``top``) or bottom-(m-k) eigenspace of ``G`` (upper triangle set).

    float32 ``G``: the eigenvectors from float32 ``eigh`` are re-solved in float64 in a window of
    ``2 * _WINDOW`` vectors around the cut (Rayleigh-Ritz), where round-off mixes kept and dropped
    directions; float64 ``G`` is solved exactly.
    """
    m = G.shape[0]
    # Column-major output, as LAPACK writes it: no copy, and column slices stay contiguous.
    Q = ws.take("eigvecs", (m, m), G).mT
    torch.linalg.eigh(G, UPLO="U", out=(ws.take("eigvals", (m,), G), Q))  # ascending eigenvalues
    cut = m - k
    if G.dtype != torch.float64:
        lo, hi = max(0, cut - _WINDOW), min(m, cut + _WINDOW)
        Qw = Q[:, lo:hi].double()
        # H = Qw^T G Qw from the upper triangle U of G: S + S^T - Qw^T diag(U) Qw with S = Qw^T U Qw
        # (one m x m x w product; (Qw^T U) is the fast orientation for BLAS).
        U = ws.take("gram64", (m, m), G, torch.float64).copy_(G).triu_()
        S = (Qw.T @ U) @ Qw
        H = S + S.T - (Qw.T * U.diagonal()) @ Qw
        # float32 eigenvectors are orthonormal only to ~1e-6: solve H z = mu C z with C = Qw^T Qw = L L^T.
        L = torch.linalg.cholesky(Qw.T @ Qw)
        Linv = torch.linalg.solve_triangular(L, torch.eye(hi - lo, dtype=L.dtype, device=L.device), upper=False)
        _, Z = torch.linalg.eigh(Linv @ H @ Linv.T)
        Q[:, lo:hi] = Qw @ (Linv.T @ Z)
    return Q[:, cut:] if top else Q[:, :cut]


def _project_matrix(M: Tensor, k: int, energy_transfer: bool, residual: float, total: float,
                    ws: _Scratch) -> Tuple[Tensor, float]:
    """LRP (+ET, + residual) of ``M`` whose squared norm is ``total``; returns the result and energy kept."""
    n, d = M.shape
    m = min(n, d)
    if k >= m or total <= torch.finfo(M.dtype).tiny:
        return M, 1.0  # nothing to cut, or an all-zero weight: leave it as it is
    left = n <= d  # work with the smaller Gram matrix
    # Multiply by whichever of the kept (k) or dropped (m - k) bases is thinner.
    top = k <= m - k
    Q = _subspace(_gram_upper(M, left, ws), k, top, ws)
    B = ws.take("coeffs", (Q.shape[1], M.shape[1]) if left else (M.shape[0], Q.shape[1]), M)
    torch.mm(Q.T, M, out=B) if left else torch.mm(M, Q, out=B)
    energy = _sq_norm(B, ws)
    kept = energy if top else max(total - energy, 0.0)
    if kept <= 0.0:
        return M, 0.0
    alpha = 1.0
    if energy_transfer:
        tail = max(total - kept, 0.0)
        alpha = math.sqrt(max(total - residual ** 2 * tail, 0.0) / kept)
    if not residual:  # one GEMM writes the result: alpha * Q B, or alpha * (M - Q B) for the dropped basis
        if top:
            Q = Q.mul_(alpha) if alpha != 1.0 else Q  # scale the thin basis, not the result
            return (Q @ B if left else B @ Q.T), kept / total
        out = torch.addmm(M, Q, B, beta=alpha, alpha=-alpha) if left else torch.addmm(M, B, Q.T, beta=alpha, alpha=-alpha)
        return out, kept / total
    part = Q @ B if left else B @ Q.T
    Mk = part if top else part.neg_().add_(M)  # part is a fresh tensor: reuse it
    return Mk * alpha + residual * (M - Mk), kept / total


def compute_projection(
    weight: Tensor,
    rank: int,
    bn_scale: Optional[Tensor],
    config: LRPETConfig,
    name: str = "weight",
) -> Tuple[Tensor, float]:
    """Like :func:`lrpet_project`, also returning the energy fraction kept before ET."""
    energy_transfer, ridge, residual = config.energy_transfer, config.ridge, config.residual
    if weight.dim() not in (2, 4):
        raise ValueError(f"layer {name!r}: weight must be 2-D or 4-D, got shape {tuple(weight.shape)}")
    n = weight.shape[0]
    d = weight[0].numel()
    m = min(n, d)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= m:
        raise ValueError(f"layer {name!r}: rank must be an integer in [1, {m}] (full rank), got {rank!r}")
    w = weight.detach()
    ws = _scratch()
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    M = w.reshape(n, d).to(dtype)
    total = _sq_norm(M, ws)
    if not math.isfinite(total):  # NaN/Inf when some entry is (or huge): then look closer
        _check_finite(w, "weight", name)
    a = None
    if bn_scale is not None:
        a = bn_scale.detach()
        if a.shape != (n,):
            raise ValueError(f"layer {name!r}: BN has {a.numel()} channels (shape {tuple(a.shape)}) but the "
                             f"weight has {n} output channels")
        _check_finite(a, "BN scale gamma/sqrt(var+eps)", name)
        a = a.to(torch.float64)
        if ridge == 0 and bool((a == 0).any()):
            raise ValueError(f"layer {name!r}: BN scale has zeros and ridge=0, so W cannot be recovered; use ridge > 0")
        M = torch.mul(M, a.to(dtype)[:, None], out=ws.take("folded", (n, d), M))
        total = _sq_norm(M, ws)  # of the folded weight
    if rank >= m:
        return weight.detach().clone(), 1.0
    if not math.isfinite(total):
        raise ValueError(f"layer {name!r}: weight norm overflows {dtype}; the weight has diverged")
    out, kept = _project_matrix(M, rank, energy_transfer, residual, total, ws)
    if a is not None:
        unfold = (a / (a * a + ridge)).to(dtype)[:, None]
        # In place on a fresh result; ``M`` itself (the scratch fold, returned when nothing was cut) is not ours to keep.
        out = out * unfold if out is M else out.mul_(unfold)
    return out.reshape(weight.shape).to(weight.dtype), kept


def lrpet_project(weight: Tensor, rank: int, *, bn_scale: Optional[Tensor] = None,
                  config: Optional[LRPETConfig] = None) -> Tensor:
    """Project one conv/linear weight onto rank ``rank`` the LRPET way (METHOD.md section 3).

    Args:
        weight: ``(n, c, kh, kw)`` or ``(n, d)`` weight; not modified.
        rank: target rank ``k`` in ``[1, min(n, c*kh*kw)]``. ``k`` equal to the full rank returns a copy.
        bn_scale: ``gamma / sqrt(running_var + eps)`` of the BN after the conv (``(n,)``), or None
            for no BN rectification. Defaults to None.
        config: ``energy_transfer``, ``ridge`` and ``residual`` come from it. Defaults to ``LRPETConfig()``.

    Returns:
        The new weight, same shape and dtype as ``weight``.
    """
    return compute_projection(weight, rank, bn_scale, config or LRPETConfig())[0]


def layer_cost(shape: Sequence[int]) -> int:
    """Relative cost of projecting a weight of ``shape``: Gram matrix ``n*d*m`` plus eigensolver ``m^3``.

    Used to balance layers over threads and over ranks (largest first).
    """
    n = int(shape[0])
    d = 1
    for s in shape[1:]:
        d *= int(s)
    m = min(n, d)
    return n * d * m + m ** 3


@contextmanager
def _one_blas_thread():
    """Run the block with torch's intra-op thread count at 1, restored afterwards (process-global).

    Each layer is then computed single-threaded whatever the caller's setting, so projection results
    do not depend on the thread count; and LAPACK's ``eigh`` (its tridiagonal reduction scales poorly)
    gets more done per core single-threaded on several layers at once than multi-threaded on one.
    The projection runs synchronously inside the training step, so no other torch work of this
    process sees the temporary setting.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def _map_layers(fn, jobs: Sequence, cost: Sequence[float]) -> List:
    """``[fn(*job) for job in jobs]``; on CPU, spread over ``torch.get_num_threads()`` Python threads.

    Layers go largest first, each computed with one BLAS thread (:func:`_one_blas_thread`); torch
    releases the GIL, so ``T`` threads project ``T`` layers at once. CUDA tensors run in order.
    """
    on_cpu = all(job[0].device.type == "cpu" for job in jobs)
    if not on_cpu or len(jobs) < 2:
        with _scratch_scope():
            return [fn(*job) for job in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -cost[i])
    with _one_blas_thread() as threads:
        if threads == 1:
            with _scratch_scope():
                out = {i: fn(*jobs[i]) for i in order}
            return [out[i] for i in range(len(jobs))]
        from concurrent.futures import ThreadPoolExecutor

        def init_worker():  # each worker thread reuses its own scratch buffers until the pool ends
            _local.scratch = _Scratch()

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lrpet", initializer=init_worker) as pool:
            futures = {i: pool.submit(fn, *jobs[i]) for i in order}
            errors = {i: f.exception() for i, f in futures.items() if f.exception() is not None}
            if errors:  # report the first failing layer in model order
                raise errors[min(errors)]
            return [futures[i].result() for i in range(len(jobs))]


def plan_ranks(layers: Sequence[ConvBN], plan: Union[RankPlan, Mapping[str, int]]) -> Dict[str, int]:
    """``{name: rank}`` of ``plan``, checking that every planned layer is among ``layers``."""
    ranks: Dict[str, int] = plan.ranks if isinstance(plan, RankPlan) else dict(plan)
    present = {l.name for l in layers}
    missing = [n for n in ranks if n not in present]
    if missing:
        raise ValueError(f"{len(missing)} planned layer(s) not found in the model: {missing[:5]}. "
                         "The plan does not belong to this model.")
    return ranks


def compute_layer_projections(
    layers: Sequence[ConvBN],
    plan: Union[RankPlan, Mapping[str, int]],
    config: LRPETConfig,
) -> List[Tuple[ConvBN, Tensor, LayerStats]]:
    """The new weights of every planned layer, without writing them (see :func:`project_`).

    Returns:
        ``(layer, new_weight, stats)`` per planned layer, in ``layers`` order.
    """
    ranks = plan_ranks(layers, plan)
    todo = []
    for layer in layers:
        name, conv, bn = layer
        if name not in ranks:
            continue
        if getattr(conv, "groups", 1) != 1:
            raise ValueError(f"layer {name!r}: grouped/depthwise conv (groups={conv.groups}) cannot be "
                             "projected; exclude it from the selection")
        w = conv.weight
        if isinstance(plan, RankPlan) and tuple(plan[name].shape) != tuple(w.shape) + (1,) * (4 - w.dim()):
            raise ValueError(f"layer {name!r}: weight shape {tuple(w.shape)} differs from the plan's "
                             f"{plan[name].shape}")
        scale = bn_scale(bn, name) if (config.bn_rectification and bn is not None) else None
        todo.append((layer, w, ranks[name], scale))

    def one(w: Tensor, layer: ConvBN, rank: int, scale: Optional[Tensor]):
        try:
            new, kept = compute_projection(w, rank, scale, config, name=layer.name)
        except Exception as e:  # e.g. an eigensolver failure: say which layer it was
            if repr(layer.name) in str(e):
                raise
            raise RuntimeError(f"layer {layer.name!r}: projection failed with {type(e).__name__}: {e}") from e
        old = w.detach()
        ws = _scratch()
        change = _stat_sq_norm(torch.sub(new, old, out=ws.take("change", new.shape, new)))
        if not math.isfinite(change):  # a NaN/Inf anywhere in ``new`` shows here
            _check_finite(new, "projected weight", layer.name)
            raise ValueError(f"layer {layer.name!r}: the weight change overflows; the weight has diverged")
        denom = math.sqrt(_stat_sq_norm(old))
        change = math.sqrt(change)
        return layer, new, LayerStats(layer.name, rank, min(w.shape[0], w[0].numel()), kept,
                                      change / denom if denom > 0 else 0.0)

    return _map_layers(one, [(w, layer, r, a) for layer, w, r, a in todo], [layer_cost(t[1].shape) for t in todo])


def write_projections_(results: Sequence[Tuple[ConvBN, Tensor, LayerStats]]) -> None:
    with torch.no_grad():
        for layer, new, _ in results:
            layer.conv.weight.copy_(new)


def layer_spectra(layers: Sequence[ConvBN], names: Sequence[str], config: Optional[LRPETConfig] = None) -> Dict[str, List[float]]:
    """Singular values (descending) of the weights the projection sees: BN-folded under BN rectification.

    For the energy rank policy (:func:`~lrpet_dense.core.build_rank_plan`). Computed in float64 from
    the smaller Gram matrix.
    """
    config = config or LRPETConfig()
    wanted = set(names)
    out = {}
    for name, conv, bn in layers:
        if name not in wanted:
            continue
        w = conv.weight.detach()
        m = w.reshape(w.shape[0], -1).double().cpu()
        if config.bn_rectification and bn is not None:
            m = m * bn_scale(bn, name).cpu()[:, None]
        ev = torch.linalg.eigvalsh(m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m)
        out[name] = ev.clamp_min(0).sqrt().flip(0).tolist()
    return out
