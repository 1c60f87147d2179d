"""Pair detectron2 convs with their BatchNorm: detectron2 keeps the norm on the conv (``conv.norm``).

``detectron2.layers.Conv2d`` carries its norm as ``conv.norm``: ``FrozenBatchNorm2d`` by default,
``BatchNorm2d``, ``SyncBatchNorm``/``NaiveSyncBatchNorm`` or none. :func:`pair_convs` selects convs
the core's way (:func:`lrpet_dense.core.selection.select_convs`: name patterns, ``filter_fn``,
frozen convs left out) and pairs each with its norm:

- a conv whose norm is a BatchNorm with running statistics is paired with it (BN rectification);
- a conv without a norm (e.g. the FPN's lateral/output convs) is projected without BN rectification;
- anything else (GroupNorm, LayerNorm, a BN without running statistics: the core's
  :func:`~lrpet_dense.core.selection.is_batchnorm` decides, for every framework alike; a plain
  ``nn.Conv2d`` whose norm detectron2 does not know about) is not guessed: it is projected without BN
  rectification and listed in :attr:`~lrpet_dense.core.Pairing.notes`, which the hook logs.

Example:
    >>> pairing = pair_convs(model, LRPETConfig())  # doctest: +SKIP
    >>> [(l.name, type(l.bn).__name__) for l in pairing.layers][:1]  # doctest: +SKIP
    [('backbone.res3.0.conv1', 'BatchNorm2d')]
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn

from lrpet_dense.core import LRPETConfig, Pairing
from lrpet_dense.core.selection import FilterFn, pair_with

__all__ = ["pair_convs", "default_include", "find_norm", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or the model itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def default_include(model: nn.Module) -> List[str]:
    """The default selection: every trained conv of the detector's backbone and its ResNet.

    ``backbone.*`` (for FPN models the ResNet ``backbone.bottom_up`` and the FPN's lateral and output
    convs) and, in C4 models (``Res5ROIHeads``), ``roi_heads.res5.*``, where the ResNet's last stage
    runs on each ROI.
    """
    model = unwrap_model(model)
    if not isinstance(getattr(model, "backbone", None), nn.Module):
        raise ValueError(f"{type(model).__name__} has no 'backbone' module; set LRPET.INCLUDE explicitly")
    patterns = ["backbone.*"]
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None and isinstance(getattr(roi_heads, "res5", None), nn.Module):
        patterns.append("roi_heads.res5.*")
    return patterns


def find_norm(name: str, conv: nn.Conv2d, parent: nn.Module, child: str) -> Tuple[Optional[nn.Module], Optional[str]]:
    """The norm detectron2 runs after ``conv`` (``conv.norm``; any type, the core pairs only BatchNorms
    with running statistics), and a note for a plain conv without a ``norm`` attribute."""
    if not hasattr(conv, "norm"):
        return None, (f"{name}: a plain {type(conv).__name__} without a detectron2 'norm' attribute; a norm "
                      "that follows it elsewhere is not inferred, so it is projected without BN rectification")
    return conv.norm, None


def pair_convs(model: nn.Module, config: Optional[LRPETConfig] = None,
               filter_fn: Optional[FilterFn] = None, *, factorized: bool = False) -> Pairing:
    """The convs of a detectron2 model (DDP-wrapped or not) that ``config`` selects, each with its
    ``conv.norm`` BatchNorm; ``filter_fn(conv, name)`` may narrow the selection further.

    ``config.include`` empty selects :func:`default_include`; see
    :func:`lrpet_dense.core.selection.select_convs` for the rules and the errors (a pattern matching
    nothing, a BatchNorm of another width, an empty selection). With ``factorized``, a factorised
    conv counts as one conv (to fold its BatchNorm for inference).
    """
    return pair_with(unwrap_model(model), config, filter_fn, default_include, find_norm, factorized)
