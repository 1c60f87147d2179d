"""Pair detectron2 convs with their BatchNorm: detectron2 keeps the norm on the conv (``conv.norm``).

``detectron2.layers.Conv2d`` carries its norm as ``conv.norm``: ``FrozenBatchNorm2d`` by default,
``BatchNorm2d``, ``SyncBatchNorm``/``NaiveSyncBatchNorm`` or none. This module turns a model into the
core's list of :class:`~lrpet_dense.core.ConvBN` ``(name, conv, bn)`` triples:

- a conv whose norm is a BatchNorm with running statistics is paired with it (BN rectification);
- a conv without a norm is projected without BN rectification;
- anything else (GroupNorm, LayerNorm, a BN without running statistics or with another channel
  count, a plain ``nn.Conv2d`` whose norm detectron2 does not know about) is not guessed: it is
  projected without BN rectification and listed in :attr:`Pairing.notes`, which the hook logs.

Example:
    >>> pairing = pair_convs(model, include=default_include(model))  # doctest: +SKIP
    >>> [(p.name, type(p.bn).__name__) for p in pairing.layers][:1]  # doctest: +SKIP
    [('backbone.res3.0.conv1', 'BatchNorm2d')]
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from detectron2.layers import FrozenBatchNorm2d

from lrpet_dense.core import ConvBN, FactorizedConv2d, match_any, select_names

__all__ = ["Pairing", "pair_convs", "default_include", "candidate_convs", "unwrap_model"]

logger = logging.getLogger(__name__)


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


def candidate_convs(model: nn.Module) -> List[Tuple[str, nn.Conv2d]]:
    """Every dense ``nn.Conv2d`` of ``model`` (detectron2's ``Conv2d`` included) with ``groups == 1``."""
    return [(n, m) for n, m in unwrap_model(model).named_modules()
            if isinstance(m, nn.Conv2d) and not isinstance(m, FactorizedConv2d) and m.groups == 1]


def _is_frozen(conv: nn.Module) -> bool:
    return not conv.weight.requires_grad


def _pair_norm(name: str, conv: nn.Conv2d) -> Tuple[Optional[nn.Module], Optional[str]]:
    """The BN to rectify with, or None, and a note when the pairing is not a clean BN/no-norm case."""
    if not hasattr(conv, "norm"):
        return None, (f"{name}: a plain {type(conv).__name__} without a detectron2 'norm' attribute; a norm "
                      "that follows it elsewhere is not inferred, so it is projected without BN rectification")
    norm = conv.norm
    if norm is None:
        return None, None
    n = conv.out_channels
    if isinstance(norm, FrozenBatchNorm2d) or (isinstance(norm, _BatchNorm) and norm.track_running_stats):
        if getattr(norm, "running_var", None) is None:
            return None, (f"{name}: norm {type(norm).__name__} has no running statistics; projected without BN "
                          "rectification")
        if norm.running_var.numel() != n:
            # Not a model this conv can run in: say so now rather than mis-rectify or fail mid-training.
            raise ValueError(f"layer {name!r}: its norm {type(norm).__name__} has {norm.running_var.numel()} "
                             f"channels but the conv has {n} output channels; fix the model, or leave the layer "
                             "out with LRPET.EXCLUDE")
        return norm, None
    return None, (f"{name}: norm {type(norm).__name__} is not a BatchNorm with running statistics, so BN "
                  "rectification does not apply; projected without it")


@dataclass
class Pairing:
    """The selected layers of a model and what the selection left out.

    Attributes:
        layers: ``(name, conv, bn)`` triples to project, in module order.
        frozen_skipped: selected convs left out because they are frozen (no gradient).
        notes: convs whose norm could not be paired sensibly (projected without BN rectification).
    """

    layers: List[ConvBN]
    frozen_skipped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def names(self) -> List[str]:
        return [l.name for l in self.layers]

    def log(self) -> None:
        """Log the selection: counts, BN pairing, skipped frozen layers and pairing notes."""
        with_bn = sum(l.bn is not None for l in self.layers)
        logger.info("LRPET selection: %d convs (%d paired with a BN for rectification, %d without)",
                    len(self.layers), with_bn, len(self.layers) - with_bn)
        if self.frozen_skipped:
            logger.info("LRPET: %d frozen convs (MODEL.BACKBONE.FREEZE_AT) are not projected "
                        "(set LRPET.INCLUDE_FROZEN True to project them): %s",
                        len(self.frozen_skipped), ", ".join(self.frozen_skipped))
        for note in self.notes:
            logger.warning("LRPET pairing: %s", note)


def pair_convs(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Sequence[str] = (),
    include_frozen: bool = False,
) -> Pairing:
    """Select convs by name pattern and pair each with its ``conv.norm`` BatchNorm.

    Args:
        model: a detectron2 model (DDP-wrapped or not).
        include: fnmatch patterns of module names; None or empty = :func:`default_include`.
        exclude: fnmatch patterns removed from the selection. Defaults to none.
        include_frozen: also select convs whose weight has ``requires_grad=False``. Defaults to False.

    Returns:
        The :class:`Pairing`.

    Raises:
        ValueError: an include pattern matches no conv, or the selection is empty.
    """
    model = unwrap_model(model)
    include = list(include) if include else default_include(model)
    convs = candidate_convs(model)
    grouped = {n: m.groups for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and not isinstance(m, FactorizedConv2d) and m.groups != 1}
    for p in include:  # a pattern that names only grouped convs asks for what LRPET cannot do
        hits = [n for n in grouped if match_any(n, [p])]
        if hits and not any(match_any(n, [p]) for n, _ in convs):
            raise ValueError(f"include pattern {p!r} selects only grouped/depthwise convs (e.g. {hits[0]!r}, "
                             f"groups={grouped[hits[0]]}); LRPET projects groups=1 convs only. Remove the pattern "
                             "from LRPET.INCLUDE")
    by_name = dict(convs)
    selected = select_names([n for n, _ in convs], include, exclude)
    layers, frozen, notes = [], [], []
    for name in selected:
        conv = by_name[name]
        if _is_frozen(conv) and not include_frozen:
            frozen.append(name)
            continue
        bn, note = _pair_norm(name, conv)
        if note:
            notes.append(note)
        layers.append(ConvBN(name, conv, bn))
    grouped = [n for n, m in unwrap_model(model).named_modules()
               if isinstance(m, nn.Conv2d) and m.groups != 1 and match_any(n, include) and not match_any(n, exclude)]
    notes += [f"{n}: grouped conv (groups != 1) cannot be projected; left out" for n in grouped]
    if not layers:
        raise ValueError(f"LRPET selected no convs to project (include={include}, exclude={list(exclude)}, "
                         f"{len(frozen)} frozen left out)")
    return Pairing(layers, frozen, notes)
