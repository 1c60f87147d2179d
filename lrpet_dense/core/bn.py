"""BatchNorm statistics recomputed for the current weights (precise BN), framework-free.

A projection changes the conv weights in one step, but the running statistics of the BatchNorm layers
after them still describe the weights before it. During training the next iterations' statistics wash
that out; after the **final** projection nothing does, so the saved model pairs low-rank weights with
stale statistics. :func:`recalibrate_bn_` recomputes them as exact averages over a number of training
batches, with the weights fixed (what fvcore's ``update_bn_stats``, behind detectron2's
``hooks.PreciseBN``, does; written here so the core needs torch only). Both framework hooks call it
after the final projection when ``LRPETConfig.precise_bn_iters > 0``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lrpet_dense.core.bn import recalibrate_bn_
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    >>> batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    >>> recalibrate_bn_(model, batches, lambda m, x: m(x), num_batches=3).num_layers
    1
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recalibrate_bn_", "RecalibrationResult", "trainable_bn_layers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecalibrationResult:
    """What :func:`recalibrate_bn_` did: how many BN layers it updated, from how many batches."""

    num_layers: int
    num_batches: int


def trainable_bn_layers(model: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """The BatchNorm layers whose running statistics training updates.

    Those that are in training mode once ``model.train()`` has run (frameworks keep some in eval mode,
    e.g. mmseg's ``norm_eval=True``) and that track running statistics. Frozen BN modules that are not
    ``_BatchNorm`` (detectron2's ``FrozenBatchNorm2d``) are never included. ``model``'s mode is restored.
    """
    was_training = model.training
    model.train()
    try:
        return [(n, m) for n, m in model.named_modules()
                if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    finally:
        model.train(was_training)


def recalibrate_bn_(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
                    num_batches: int) -> RecalibrationResult:
    """Recompute the running statistics of ``model``'s trainable BN layers from ``num_batches`` batches.

    Each layer's ``running_mean`` / ``running_var`` become the plain average, over the batches, of the
    batch means / unbiased batch variances its input had (momentum ``None``: a cumulative average, as
    fvcore's ``update_bn_stats``), computed in training mode with no gradient; weights are not touched.
    In a distributed job (``torch.distributed`` initialised, several ranks) the statistics are then
    averaged over the ranks, so every rank ends with the same buffers (SyncBN's already are).

    Atomic: if a forward fails, the batches run out before the first one, or a statistic comes out
    non-finite, every buffer and momentum is restored and the error is raised.

    Args:
        model: the model (its mode is restored afterwards).
        batches: an iterable of batches, e.g. the training data loader (iterated once, lazily).
        forward: ``forward(model, batch)`` runs the model on a batch in its training-mode path (its
            return value is ignored), e.g. ``lambda m, b: m(b)``.
        num_batches: how many batches to average over (>= 1). Fewer are used, with a warning, if
            ``batches`` runs out first.

    Returns:
        :class:`RecalibrationResult`.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
    layers = trainable_bn_layers(model)
    if not layers:
        logger.info("BN recalibration: the model has no trainable BatchNorm layer; nothing to do")
        return RecalibrationResult(0, 0)
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for _, m in layers]
    calls = [0] * len(layers)
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, (_, m) in enumerate(layers)]
    was_training = model.training
    used = 0
    try:
        for _, m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
        model.train()
        with torch.no_grad():
            for _, batch in zip(range(num_batches), batches):  # range first: no batch drawn beyond the last
                forward(model, batch)
                used += 1
        if used == 0:
            raise ValueError("BN recalibration: the batches ran out before the first one")
        # A layer the forward never reached (e.g. a head only a training loss uses) keeps its statistics.
        unused = [i for i, c in enumerate(calls) if c == 0]
        for i in unused:
            _restore(layers[i][1], saved[i])
        if unused:
            logger.warning("BN recalibration: %d BatchNorm layer(s) were not reached by the forward and keep their "
                           "statistics, e.g. %s", len(unused), [layers[i][0] for i in unused[:3]])
        layers = [layer for i, layer in enumerate(layers) if calls[i]]
        saved = [state for i, state in enumerate(saved) if calls[i]]
        _average_over_ranks([m for _, m in layers])
        bad = [n for n, m in layers if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all())]
        if bad:
            raise FloatingPointError(f"BN recalibration gave non-finite statistics in {len(bad)} layer(s), e.g. "
                                     f"{bad[:3]}: the model's activations overflow on the training data")
    except BaseException:
        for (_, m), state in zip(layers, saved):
            _restore(m, state)
        raise
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for (_, m), (momentum, *_rest) in zip(layers, saved):
        m.momentum = momentum
    if used < num_batches:
        logger.warning("BN recalibration: the batches ran out after %d of the %d asked for", used, num_batches)
    logger.info("BN recalibration: running statistics of %d BatchNorm layers recomputed from %d batches",
                len(layers), used)
    return RecalibrationResult(len(layers), used)


def _restore(m: _BatchNorm, state) -> None:
    momentum, mean, var, tracked = state
    m.momentum = momentum
    m.running_mean.copy_(mean)
    m.running_var.copy_(var)
    m.num_batches_tracked.copy_(tracked)


def _average_over_ranks(bns: List[_BatchNorm]) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    world = dist.get_world_size()
    for m in bns:
        for buf in (m.running_mean, m.running_var):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)
