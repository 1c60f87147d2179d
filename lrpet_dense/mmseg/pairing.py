"""Pair each conv of an mmseg model with the BatchNorm that follows it.

mmseg keeps norms in three ways, all turned into the same ``(name, conv, bn)`` list
(:class:`~lrpet_dense.core.ConvBN`) that the core projects:

* ResNet blocks and the plain ResNet stem keep the norm as a **sibling**: ``conv1`` is followed by
  the module named ``self.norm1_name`` (``bn1``), ``conv2`` by ``norm2_name``, ...
* The deep stem of ResNetV1c and the downsample branches are ``Sequential(conv, bn, ...)``
  (``Sequential(AvgPool, conv, bn)`` with ``avg_down``): a conv is paired with the next entry.
* ``mmcv.cnn.ConvModule`` (PSP head, FCN head) keeps ``.conv`` and the norm named ``norm_name``,
  paired only when its ``order`` puts the norm after the conv.

BN and SyncBN (torch's and mmcv's) are recognised. Convs with no BN after them are returned
separately so they can be reported (their projection runs without BN rectification).
"""
from __future__ import annotations

import logging
import re
from typing import List, Optional, Sequence, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lrpet_dense.core import ConvBN, FactorizedConv2d, match_any, select_names

__all__ = ["is_batchnorm", "pair_conv_bn", "DEFAULT_INCLUDE"]

logger = logging.getLogger(__name__)

#: Default layer selection: every conv of the backbone (ResNetV1c: deep stem, blocks, downsample).
DEFAULT_INCLUDE: Tuple[str, ...] = ("backbone.*",)

_CONV_INDEX = re.compile(r"^conv(\d+)$")


def is_batchnorm(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` is a BatchNorm with running statistics (BN, SyncBN, mmcv SyncBN)."""
    if module is None:
        return False
    if isinstance(module, _BatchNorm):
        return True
    # mmcv.ops.SyncBatchNorm does not derive from _BatchNorm; recognise it by its statistics.
    return "BatchNorm" in type(module).__name__ and hasattr(module, "running_var") and hasattr(module, "eps")


def _sibling_norm(parent: nn.Module, child: str) -> Optional[nn.Module]:
    """``conv{i}`` -> the module named by ``parent.norm{i}_name`` (mmseg ResNet/Bottleneck style)."""
    m = _CONV_INDEX.match(child)
    if m is None:
        return None
    norm_name = getattr(parent, f"norm{m.group(1)}_name", None)
    if not isinstance(norm_name, str):
        return None
    return getattr(parent, norm_name, None)


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


def _find_norm(parent: nn.Module, child: str) -> Optional[nn.Module]:
    for finder in (_sibling_norm, _conv_module_norm, _sequential_norm):
        norm = finder(parent, child)
        if norm is not None:
            return norm if is_batchnorm(norm) else None
    return None


def pair_conv_bn(
    model: nn.Module,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = (),
    skip_frozen: bool = True,
) -> Tuple[List[ConvBN], List[str], List[str]]:
    """Every selectable ``nn.Conv2d`` of ``model`` with the BN that follows it.

    Args:
        model: the (unwrapped) segmentor, e.g. an ``EncoderDecoder``.
        include: fnmatch patterns of module names to select (``*`` spans dots). Each must match
            some conv. Defaults to :data:`DEFAULT_INCLUDE` (every conv of the backbone).
        exclude: fnmatch patterns of module names to leave out. Defaults to ().
        skip_frozen: leave out convs whose weight has ``requires_grad=False`` (frozen stages get no
            gradient, so projecting them is a one-shot truncation). Defaults to True.

    Returns:
        ``(pairs, unpaired, frozen)``: the selected layers as :class:`ConvBN` (``bn`` is None for
        a conv with no BatchNorm after it), the names of the selected convs without a BN, and the
        names skipped because they are frozen.
    """
    convs = {}
    parents = {}
    grouped = {}
    for parent_name, parent in model.named_modules():
        if isinstance(parent, FactorizedConv2d):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if child.groups != 1:
                    grouped[full] = child.groups
                    continue
                convs[full] = child
                parents[full] = (parent, child_name)
    for p in include:  # a pattern that names only grouped convs asks for what LRPET cannot do
        hits = [n for n in grouped if match_any(n, [p])]
        if hits and not any(match_any(n, [p]) for n in convs):
            raise ValueError(f"include pattern {p!r} selects only grouped/depthwise convs (e.g. {hits[0]!r}, "
                             f"groups={grouped[hits[0]]}); LRPET projects groups=1 convs only. Remove the pattern")
    left_out = [n for n in grouped if match_any(n, include) and not match_any(n, exclude)]
    if left_out:
        logger.warning("LRPET: %d grouped/depthwise conv(s) cannot be projected and are left out: %s",
                       len(left_out), left_out[:5])
    names = select_names(list(convs), include, exclude)
    pairs, unpaired, frozen = [], [], []
    for name in names:
        conv = convs[name]
        if skip_frozen and not conv.weight.requires_grad:
            frozen.append(name)
            continue
        parent, child_name = parents[name]
        bn = _find_norm(parent, child_name)
        width = getattr(bn, "num_features", conv.out_channels) if bn is not None else conv.out_channels
        if width != conv.out_channels:
            # Not a model this conv can run in: say so now rather than fail at the first projection.
            raise ValueError(f"layer {name!r}: its BatchNorm {type(bn).__name__} has {width} channels but the conv "
                             f"has {conv.out_channels} output channels; fix the model, or leave the layer out "
                             "with the hook's exclude=[...]")
        if bn is None:
            unpaired.append(name)
        pairs.append(ConvBN(name, conv, bn))
    return pairs, unpaired, frozen
