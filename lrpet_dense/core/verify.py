"""Checks that a factorised model computes what the projected dense model computes.

Every path that changes a model's structure (compression, loading a compressed checkpoint, export)
checks what it produced: :func:`rank_excess` before factorising (a conv that is not of its planned
rank would change the outputs), :func:`compare_outputs` after (the factorised model's outputs
against the dense model's, computed in float64 so that the comparison does not depend on the CPU's
float32 kernels).

Why float64 and what tolerance: the factorised weights are ``U_k S_k^1/2`` and ``S_k^1/2 V_k^T`` of
the dense weight's float64 SVD, stored in the model's float32. Run in float64, the two models differ
only by that storage round-off (relative ~1e-7 per layer) and by the float32 round-off tail of the
projected weight beyond rank ``k`` (also ~1e-7 relative): ~1e-6 after a few dozen layers, the same
on every machine. A wrong factorisation (a conv bypassed, a wrong rank, a stale weight) differs by
O(1e-2) or more. The default tolerance, 1e-4 of the output's largest magnitude, lies between.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .rank import RankPlan

__all__ = ["compare_outputs", "OutputMismatchError"]  # the rest is internal to lrpet_dense


class OutputMismatchError(ValueError):
    """A model's outputs differ from the reference model's beyond the tolerance."""


def rank_excess(model: nn.Module, plan: Union[RankPlan, Mapping[str, int]], rtol: float = 1e-4) -> Dict[str, Tuple[int, int]]:
    """Planned convs whose weight has numerical rank above the planned rank.

    The numerical rank counts singular values above ``rtol * s_1``, from the float64 eigenvalues of
    the smaller Gram matrix (``s_i^2``); a projected float32 weight has a round-off tail ~1e-7.

    Returns:
        ``{name: (numerical rank, planned rank)}`` for each offending layer; empty when all are low-rank.
    """
    ranks = plan.ranks if isinstance(plan, RankPlan) else dict(plan)
    bad = {}
    for name, k in ranks.items():
        w = model.get_submodule(name).weight.detach()
        m = w.reshape(w.shape[0], -1).double().cpu()
        ev = torch.linalg.eigvalsh(m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m)
        r = int((ev > rtol ** 2 * ev[-1]).sum()) if ev[-1] > 0 else 0
        if r > k:
            bad[name] = (r, k)
    return bad


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in eval mode, on CPU (the original is not touched)."""
    return copy.deepcopy(model).cpu().double().eval()


def _flatten(out: Any, prefix: str = "") -> List[Tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if isinstance(out, Mapping):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in out.items()]
    elif isinstance(out, (list, tuple)):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(out)]
    else:
        return []
    flat = []
    for key, value in items:
        flat += _flatten(value, key)
    return flat


def compare_outputs(reference: Any, candidate: Any, *, rtol: float = 1e-4, what: str = "the factorised model") -> Dict[str, float]:
    """Compare two nested structures of tensors (dicts, lists, tuples) entry by entry.

    Each tensor must have the same keys and shape, and ``max|candidate - reference| <= rtol *
    max|reference|`` (a relative bound on the entry's scale, so it does not depend on units).

    Returns:
        ``{entry: relative error}``.

    Raises:
        OutputMismatchError: a key or shape differs, a value is not finite, or an error exceeds ``rtol``.
    """
    ref, got = dict(_flatten(reference)), dict(_flatten(candidate))
    if ref.keys() != got.keys():
        raise OutputMismatchError(f"{what} returns other outputs than the reference: {sorted(ref)[:5]} vs {sorted(got)[:5]}")
    errors = {}
    for key, r in ref.items():
        g = got[key]
        if g.shape != r.shape:
            raise OutputMismatchError(f"{what}: output {key!r} has shape {tuple(g.shape)}, the reference {tuple(r.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise OutputMismatchError(f"{what}: output {key!r} has NaN/Inf values")
        r64, g64 = r.detach().double(), g.detach().double()
        scale = r64.abs().max().item() if r64.numel() else 0.0
        err = (g64 - r64).abs().max().item() if r64.numel() else 0.0
        errors[key] = err / scale if scale > 0 else err
    worst = max(errors, key=errors.get) if errors else None
    if worst is not None and errors[worst] > rtol:
        raise OutputMismatchError(
            f"{what} does not compute what the dense model computes: output {worst!r} differs by "
            f"{errors[worst]:.2e} of its scale (tolerance {rtol:g}, float64). Nothing was written.")
    return errors


def factorize_checked_(model: nn.Module, plan: RankPlan, outputs: Callable[[nn.Module], Any], *,
                       project_layers: Optional[Sequence] = None, config=None, rtol: float = 1e-4,
                       what: str = "the factorised model") -> List[str]:
    """Factorise a projected dense model in place, but only once the result has been checked.

    1. With ``project_layers`` (``ConvBN`` triples), project them onto their planned rank first (a
       one-shot truncation, with ``config``'s options).
    2. Refuse when a planned conv is not of its planned rank (:func:`rank_excess`): factorising it
       would change the model's outputs.
    3. Factorise a copy, and compare ``outputs(model)`` (a nested structure of tensors, e.g. logits)
       of the dense model and of the copy, both in float64 (:func:`compare_outputs`).
    4. Only then factorise ``model`` itself.

    Returns:
        The names of the factorised convs.

    Raises:
        ValueError: step 2 or 3 failed; ``model`` is not factorised (step 1's projection, if asked
            for, has happened).
    """
    from .factorize import factorize_
    from .distributed import project_

    if project_layers is not None:
        project_(project_layers, plan, config, distributed=False)
    bad = rank_excess(model, plan)
    if bad:
        examples = [(n, r, k) for n, (r, k) in list(bad.items())[:3]]
        raise ValueError(f"{len(bad)} planned conv(s) are not of their planned rank, e.g. {examples} (name, numerical "
                         "rank, planned rank): the weights were not projected with this plan (not an LRPET-trained "
                         "checkpoint, or saved before the final projection). Factorising them would change the "
                         "model's outputs; to project them first (a one-shot truncation), pass --project "
                         "(project=True)")
    return transform_checked_(model, lambda m: factorize_(m, plan), outputs, rtol=rtol, what=what)


def transform_checked_(model: nn.Module, transform: Callable[[nn.Module], Any], outputs: Callable[[nn.Module], Any],
                       *, rtol: float = 1e-4, what: str = "the transformed model") -> Any:
    """Apply ``transform`` (an in-place model surgery) to ``model`` only once a copy passed the check.

    The copy's ``outputs`` must equal the untouched model's in float64 (:func:`compare_outputs`);
    otherwise ``model`` is left as it is and :class:`OutputMismatchError` is raised.

    Returns:
        What ``transform(model)`` returns.
    """
    with torch.no_grad():
        reference = outputs(float64_copy(model))
        rehearsal = copy.deepcopy(model)
        transform(rehearsal)
        compare_outputs(reference, outputs(float64_copy(rehearsal)), rtol=rtol, what=what)
    del rehearsal
    return transform(model)
