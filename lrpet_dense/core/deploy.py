"""The inference form of a (compressed) model: BatchNorm folded into the convs, channels_last on CPU.

:func:`fold_bn_` folds each BatchNorm that follows a conv (the pairs a framework adapter's
``pair_convs`` finds) into that conv: into the weight and a bias of a dense conv, into ``conv_b`` of a
:class:`~lrpet_dense.core.FactorizedConv2d` (whose rank it does not change: the fold scales rows).
Every reference to the BatchNorm is then replaced by ``nn.Identity`` (the same surgery as
factorisation, so plain-list references are replaced too). The folded model computes what the
unfolded one computes in eval mode (running statistics): inference only; training it is an error.

:func:`to_inference_layout_` converts the weights to ``channels_last`` on CPU, the layout in which
oneDNN runs the thin 1x1 convs of factorised layers fastest (``benchmarks/README.md``), and gives the
1x1 convs left dense the same oneDNN kernel; PyTorch then keeps activations channels_last from the
first conv on, so inputs need no conversion.

:func:`align_ranks_` zero-pads factorised ranks to a multiple of the vector width (exact): the export
path does it on a copy (:func:`aligned_for_export`), as ONNX Runtime runs aligned ranks faster.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, List, Sequence, Tuple

import torch
from torch import nn

from .config import LRPETConfig
from .factorize import FactorizedConv2d, PointwiseConv2d, is_pointwise, replace_everywhere
from .macs import factorization_saves, full_rank
from .projection import ConvBN, bn_scale
from .verify import transform_checked_

__all__ = ["fold_bn_", "to_inference_layout_", "to_inference_checked_", "unaligned_ranks", "align_ranks_",
           "aligned_for_export", "EVERY_CONV"]

logger = logging.getLogger(__name__)

#: Options that select every conv (frozen ones included): what the BatchNorm folding pairs.
EVERY_CONV = LRPETConfig(include=("*",), include_frozen=True)

#: Attribute set on a model whose BatchNorms were folded (inference only).
FOLDED_ATTR = "_lrpet_bn_folded"


def _fold_into(conv: nn.Conv2d, bn: nn.Module, name: str) -> None:
    """``bn(conv(x)) == conv'(x)``: scale the output rows of ``conv`` and give it the folded bias."""
    scale = bn_scale(bn, name)  # float64: gamma / sqrt(var + eps)
    mean = bn.running_mean.detach().double()
    beta = bn.bias.detach().double() if getattr(bn, "bias", None) is not None else torch.zeros_like(mean)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    with torch.no_grad():
        w = conv.weight
        w.copy_((w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        new_bias = ((bias - mean) * scale + beta).to(w.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def fold_bn_(model: nn.Module, layers: Sequence[ConvBN]) -> List[str]:
    """Fold each paired BatchNorm of ``layers`` into its conv (dense or factorised), in place; eval only.

    Args:
        model: the model holding the layers (its references to each BatchNorm are replaced by
            ``nn.Identity``).
        layers: ``(name, conv, bn)`` triples, e.g. from a framework adapter's ``pair_convs`` with
            ``include=("*",)``; where ``conv`` was factorised, pass the :class:`FactorizedConv2d` (the
            fold goes into its ``conv_b``). Triples without a BatchNorm are skipped.

    Returns:
        The names of the convs whose BatchNorm was folded.

    Raises:
        ValueError: a BatchNorm has no running statistics, or is shared by two convs.
    """
    seen = {}
    todo = []
    for name, conv, bn in layers:
        if bn is None:
            continue
        if id(bn) in seen:
            raise ValueError(f"the BatchNorm after {name!r} also follows {seen[id(bn)]!r}: it cannot be folded into both")
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ValueError(f"layer {name!r}: its norm {type(bn).__name__} has no running statistics to fold")
        seen[id(bn)] = name
        todo.append((name, conv, bn))
    undo: list = []
    for name, conv, bn in todo:  # every reference to the BN becomes Identity (atomic with the folds below)
        replace_everywhere(model, bn, nn.Identity(), undo)
    for name, conv, bn in todo:
        target = conv.conv_b if isinstance(conv, FactorizedConv2d) else conv
        _fold_into(target, bn, name)
    object.__setattr__(model, FOLDED_ATTR, True)
    logger.info("folded %d BatchNorms into their convs (inference form)", len(todo))
    return [n for n, _, _ in todo]


def unaligned_ranks(model: nn.Module, multiple: int = 16, *, paddable: bool = False) -> Tuple[List[str], int]:
    """The factorised convs whose rank is not a multiple of ``multiple``, among those wide enough to have
    one (full rank at least ``multiple``), and how many factorised convs the model has. With
    ``paddable``, only those :func:`align_ranks_` would pad (their padded pair still cheaper than dense).

    CPU kernels run such ranks markedly slower than aligned ones (ONNX Runtime above all:
    ``benchmarks/README.md``, "Deploy path latency"); plans made with ``rank_multiple=16`` avoid them, and
    :func:`align_ranks_` pads them at export.
    """
    total = sum(isinstance(m, FactorizedConv2d) for m in model.modules())
    if paddable:
        return [name for name, _, _ in _paddings(model, multiple)], total
    names = [name for name, m in model.named_modules() if isinstance(m, FactorizedConv2d)
             and full_rank((m.out_channels, m.in_channels, *m.kernel_size)) >= multiple and m.rank % multiple]
    return names, total


def _check_multiple(multiple: int) -> None:
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"the rank multiple must be an integer >= 1, got {multiple!r}")


def _paddings(model: nn.Module, multiple: int):
    """``(name, conv, padded rank)`` of each factorised conv :func:`align_ranks_` pads: its rank rounded up
    to the next multiple, where the conv is at least that wide and the padded pair stays cheaper than dense."""
    for name, m in model.named_modules():
        if isinstance(m, FactorizedConv2d):
            shape = (m.out_channels, m.in_channels, *m.kernel_size)
            padded = -(-m.rank // multiple) * multiple
            if padded != m.rank and full_rank(shape) >= multiple and factorization_saves(shape, padded):
                yield name, m, padded


def _zero_padded(weight: torch.Tensor, dim: int, size: int) -> nn.Parameter:
    """``weight`` grown to ``size`` along ``dim`` with zeros, in its memory format and requires_grad."""
    shape = list(weight.shape)
    shape[dim] = size
    fmt = torch.channels_last if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) \
        and not weight.is_contiguous() else torch.contiguous_format
    out = weight.new_zeros(shape).contiguous(memory_format=fmt)
    out.narrow(dim, 0, weight.shape[dim]).copy_(weight.detach())
    return nn.Parameter(out, requires_grad=weight.requires_grad)


def align_ranks_(model: nn.Module, multiple: int = 16) -> List[str]:
    """Zero-pad the rank of every factorised conv up to a multiple of ``multiple``, in place.

    ``conv_a`` gets extra output channels with zero weights (it has no bias, so they are zero) and
    ``conv_b`` reads them with zero weights: the layer computes exactly what it computed (up to the
    kernels' summation order), with more MACs. Runtimes that block channels by the vector width run
    it faster: padded to 16, ONNX Runtime ran unaligned plans' backbones 9-15% and whole models 5-13%
    faster on an AVX-512 Xeon, eager PyTorch no faster (``benchmarks/README.md``, "Deploy path latency"); hence the export path
    pads (on a copy: :func:`aligned_for_export`) and :func:`to_inference_layout_` does not. A conv
    narrower than ``multiple``, or whose padded pair would cost as much as the dense conv, is left as
    it is. For a deployed model only: the padded ranks are not the trained plan's.

    Returns:
        The names of the padded convs.
    """
    _check_multiple(multiple)
    todo = list(_paddings(model, multiple))
    for name, m, rank in todo:
        m.conv_a.weight = _zero_padded(m.conv_a.weight, 0, rank)
        m.conv_b.weight = _zero_padded(m.conv_b.weight, 1, rank)
        m.conv_a.out_channels = rank
        m.conv_b.in_channels = rank
    if todo:
        logger.info("ranks of %d factorised convs zero-padded to multiples of %d", len(todo), multiple)
    return [name for name, _, _ in todo]


def aligned_for_export(model: nn.Module, multiple: int = 16) -> Tuple[nn.Module, List[str]]:
    """``model`` itself when no rank needs padding, else a copy with :func:`align_ranks_` applied (the
    model given is never changed); and the names of the padded convs. The export path
    (:func:`lrpet_dense.core.export.export_aligned`) checks the copy's exported outputs against ``model``'s."""
    _check_multiple(multiple)
    if next(_paddings(model, multiple), None) is None:
        return model, []
    padded = copy.deepcopy(model)
    return padded, align_ranks_(padded, multiple)


def _plain_pointwise(m: nn.Module, conv_types: Tuple[type, ...]) -> bool:
    """A dense unstrided 1x1 conv whose forward is exactly ``nn.Conv2d``'s (given the types allowed)."""
    if type(m) is not nn.Conv2d and type(m) not in conv_types:
        return False
    if type(m) is not nn.Conv2d:  # a framework's Conv2d: only when its norm was folded and it has no activation
        norm = getattr(m, "norm", None)
        if not (norm is None or isinstance(norm, nn.Identity)) or getattr(m, "activation", None) is not None:
            return False
    return m.groups == 1 and is_pointwise(m.kernel_size, m.stride, m.padding, m.dilation, m.padding_mode)


def to_inference_layout_(model: nn.Module, conv_types: Tuple[type, ...] = ()) -> nn.Module:
    """On CPU: ``channels_last`` weights, and every dense unstrided 1x1 conv on the oneDNN kernel; no-op elsewhere.

    channels_last is oneDNN's fast layout for the thin 1x1 convs of factorised layers. The 1x1 convs
    left dense get the same kernel (their class becomes :class:`PointwiseConv2d`: the same parameters
    and, outside CPU float32 inference, the same ``nn.Conv2d`` forward), so that a layer is not faster
    factorised only because of its kernel, and the dense parts of the model gain too.

    Args:
        conv_types: ``nn.Conv2d`` subclasses of a framework whose forward is ``nn.Conv2d``'s once their
            ``norm`` is folded (``None`` or ``nn.Identity``) and ``activation`` is None (detectron2's
            ``Conv2d``). Plain ``nn.Conv2d`` always qualifies.
    """
    if all(p.device.type == "cpu" for p in model.parameters()):
        swapped = 0
        for m in model.modules():
            if _plain_pointwise(m, tuple(conv_types)):
                m.__class__ = PointwiseConv2d
                swapped += 1
        model.to(memory_format=torch.channels_last)
        logger.info("inference layout: channels_last, %d dense 1x1 convs on the oneDNN kernel", swapped)
    return model


def to_inference_checked_(model: nn.Module, layers_of: Callable[[nn.Module], Sequence[ConvBN]],
                          outputs: Callable[[nn.Module], Any], *, conv_types: Tuple[type, ...] = (),
                          rtol: float = 1e-4, what: str = "the model with its BatchNorms folded") -> nn.Module:
    """The deploy path's inference form, in place: :func:`fold_bn_` checked first on a copy, then
    :func:`to_inference_layout_`.

    Args:
        layers_of: the ``(name, conv, bn)`` triples of a model (a framework adapter's ``pair_convs`` with
            :data:`EVERY_CONV`, factorised convs included); called on the copy and on ``model``.
        outputs: the model's pre-discrete outputs on a fixed input; the folded copy's must equal the
            model's in float64 (:func:`~lrpet_dense.core.verify.transform_checked_`), else nothing changes.
        conv_types: passed to :func:`to_inference_layout_`.
    """
    transform_checked_(model, lambda m: fold_bn_(m, layers_of(m)), outputs, rtol=rtol, what=what)
    return to_inference_layout_(model, conv_types)
