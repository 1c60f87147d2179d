"""Pair each conv of an OpenMMLab model (mmseg segmentor, mmdet detector) with the BatchNorm that follows it.

mmseg and mmdet keep norms in the same three ways, all turned into the same
:class:`~lrpet_dense.core.Pairing` of ``(name, conv, bn)`` triples that the core projects (selection as in the core:
:func:`lrpet_dense.core.selection.select_convs`):

* ResNet blocks and the plain ResNet stem (mmseg's and mmdet's ``ResNet``) keep the norm as a
  **sibling**: ``conv1`` is followed by the module named ``self.norm1_name`` (``bn1``), ``conv2`` by
  ``norm2_name``, ...
* The deep stem of ResNetV1c and the downsample branches are ``Sequential(conv, bn, ...)``
  (``Sequential(AvgPool, conv, bn)`` with ``avg_down``): a conv is paired with the next entry.
* ``mmcv.cnn.ConvModule`` (PSP and FCN heads; FPN and RetinaNet head convs, which have no norm by
  default) keeps ``.conv`` and the norm named ``norm_name``, paired only when its ``order`` puts the
  norm after the conv.

BN and SyncBN (torch's and mmcv's) are recognised (the core's
:func:`~lrpet_dense.core.selection.is_batchnorm`). Convs with no BN after them are projected without BN
rectification (:attr:`~lrpet_dense.core.Pairing.unpaired`, which the hook reports); a norm of another
kind (GroupNorm, ...) is not used for rectification and is listed in the pairing's notes, which the
hook logs as a warning.
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

from torch import nn

from lrpet_dense.core import LRPETConfig, Pairing
from lrpet_dense.core.selection import FilterFn, is_batchnorm, pair_with

__all__ = ["pair_convs", "default_include", "find_norm", "unwrap_model", "is_batchnorm"]

_CONV_INDEX = re.compile(r"^conv(\d+)$")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside an mmengine/torch model wrapper (or the model itself)."""
    from mmengine.model import is_model_wrapper

    while is_model_wrapper(model):
        model = model.module
    return model


def default_include(model: nn.Module) -> List[str]:
    """The default selection: every conv of the backbone (ResNet / ResNetV1c: stem, blocks, downsample)."""
    if not isinstance(getattr(unwrap_model(model), "backbone", None), nn.Module):
        raise ValueError(f"{type(model).__name__} has no 'backbone' module; give include=[...] explicitly")
    return ["backbone.*"]


def _sibling_norm(parent: nn.Module, child: str) -> Optional[nn.Module]:
    """``conv{i}`` -> the module named by ``parent.norm{i}_name`` (mmseg / mmdet ResNet and Bottleneck style)."""
    m = _CONV_INDEX.match(child)
    if m is None:
        return None
    norm_name = getattr(parent, f"norm{m.group(1)}_name", None)
    return getattr(parent, norm_name, None) if isinstance(norm_name, str) else None


def _conv_module_norm(parent: nn.Module, child: str) -> Optional[nn.Module]:
    """``ConvModule.conv`` -> its norm, when the norm comes after the conv in ``order``."""
    if child != "conv" or not getattr(parent, "with_norm", False):
        return None
    order = tuple(getattr(parent, "order", ("conv", "norm", "act")))
    if "norm" not in order or order.index("norm") < order.index("conv"):
        return None  # pre-activation (norm before conv): nothing to rectify with
    norm_name = getattr(parent, "norm_name", None)
    return getattr(parent, norm_name, None) if isinstance(norm_name, str) else None


def _sequential_norm(parent: nn.Module, child: str) -> Optional[nn.Module]:
    """``Sequential(..., conv, bn, ...)``: the entry right after the conv."""
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    i = keys.index(child)
    return parent._modules[keys[i + 1]] if i + 1 < len(keys) else None


def find_norm(name: str, conv: nn.Conv2d, parent: nn.Module, child: str) -> Tuple[Optional[nn.Module], Optional[str]]:
    """The norm mmseg / mmdet runs after ``conv`` (sibling ``normN_name``, ``ConvModule``, ``Sequential``; any type:
    the core pairs only BatchNorms with running statistics and notes any other norm), or None."""
    for finder in (_sibling_norm, _conv_module_norm, _sequential_norm):
        norm = finder(parent, child)
        if norm is not None:
            return norm, None
    return None, None


def pair_convs(model: nn.Module, config: Optional[LRPETConfig] = None,
               filter_fn: Optional[FilterFn] = None, *, factorized: bool = False) -> Pairing:
    """The convs of a segmentor or detector (e.g. an ``EncoderDecoder``, a ``FasterRCNN``; wrapped or not) that
    ``config`` selects,
    each with the BatchNorm after it (sibling ``bnN``, ``Sequential``, ``ConvModule``).

    ``config.include`` empty selects :func:`default_include`; ``filter_fn(conv, name)`` may narrow the
    selection; the rules and errors are :func:`lrpet_dense.core.selection.select_convs`'s. With
    ``factorized``, a factorised conv counts as one conv (to fold its BatchNorm for inference).
    """
    return pair_with(unwrap_model(model), config, filter_fn, default_include, find_norm, factorized)
