"""Factorised convs for inference (METHOD.md section 5) and the model surgery that installs them.

A rank-k conv ``W`` (``n x c x kh x kw``) becomes ``conv_a`` (``kh x kw``, ``c -> k``, same stride,
padding, dilation, padding mode, no bias) followed by ``conv_b`` (``1 x 1``, ``k -> n``, the
original bias), from the SVD ``W = U S V^T``: ``conv_b = U_k S_k^1/2``, ``conv_a = S_k^1/2 V_k^T``.
A norm/activation carried by the conv itself (detectron2's ``Conv2d.norm``/``.activation``) stays
after ``conv_b`` under the same attribute names, so checkpoint keys of the norm do not change.

The 1x1 convs of the pair (``conv_b``, and ``conv_a`` of a 1x1 conv) are :class:`PointwiseConv2d`:
an ``nn.Conv2d`` (same parameters, state-dict keys and module hooks) that, in CPU float32 inference
on channels_last inputs, always runs oneDNN's kernel, which PyTorch skips for unstrided 1x1 convs on
one thread (factorisation turns every conv into one with a 1x1 half, so this matters more for the
factorised model than for the dense one). For the best CPU latency run factorised models in
channels_last. See ``benchmarks/README.md``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lrpet_dense.core import FactorizedConv2d
    >>> conv = nn.Conv2d(32, 64, 3, padding=1)
    >>> f = FactorizedConv2d.from_conv(conv, rank=8)
    >>> f.conv_a.weight.shape, f.conv_b.weight.shape
    (torch.Size([8, 32, 3, 3]), torch.Size([64, 8, 1, 1]))
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .rank import RankPlan

__all__ = ["FactorizedConv2d", "PointwiseConv2d", "factorize_", "build_factorized_", "get_submodule",
           "set_submodule"]

logger = logging.getLogger(__name__)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


class PointwiseConv2d(nn.Conv2d):
    """A 1x1, stride-1, unpadded, ungrouped ``nn.Conv2d`` with a CPU inference fast path.

    Exactly an ``nn.Conv2d`` in training, under autograd, on other devices and dtypes, for
    contiguous (NCHW) inputs, and while traced, scripted or compiled (so FLOP counters that trace
    ``aten::_convolution`` see it). In CPU float32 inference on a channels_last input it runs
    oneDNN's convolution (``torch.mkldnn_convolution``, what PyTorch itself runs there on several
    threads), which PyTorch does not pick for an unstrided 1x1 conv of a small batch on one thread:
    it takes its im2col/GEMM path instead, about half as fast (measured 40-55 vs 100-115 GMAC/s per
    core on AVX-512, see ``benchmarks/README.md``).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def _fast_path_ok(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                and self.weight.dtype == torch.float32 and self.weight.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and not torch.jit.is_scripting() and not torch.jit.is_tracing() and not _compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._fast_path_ok(x) and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            w = self.weight.contiguous(memory_format=torch.channels_last)
            return torch.mkldnn_convolution(x, w, self.bias, (0, 0), (1, 1), (1, 1), 1)
        return super().forward(x)


def _is_pointwise(kernel_size, stride, padding, dilation, padding_mode: str) -> bool:
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (pair(kernel_size) == (1, 1) and pair(stride) == (1, 1) and pair(padding) == (0, 0)
            and pair(dilation) == (1, 1) and padding_mode == "zeros")


class FactorizedConv2d(nn.Module):
    """Two thin convs replacing one rank-k conv.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode: as for
            ``nn.Conv2d`` (``conv_a`` takes them; ``conv_b`` is 1x1).
        rank: the inner width ``k``.
        bias: whether ``conv_b`` has a bias. Defaults to True.
        norm: optional module applied after ``conv_b`` (detectron2 style). Defaults to None.
        activation: optional callable applied last. Defaults to None.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, padding_mode: str = "zeros",
                 norm: Optional[nn.Module] = None, activation: Optional[Callable] = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if _is_pointwise(kernel_size, stride, padding, dilation, padding_mode):
            self.conv_a = PointwiseConv2d(in_channels, rank, bias=False)
        else:
            self.conv_a = nn.Conv2d(in_channels, rank, kernel_size, stride=stride, padding=padding,
                                    dilation=dilation, bias=False, padding_mode=padding_mode)
        self.conv_b = PointwiseConv2d(rank, out_channels, bias=bias)
        self.norm = norm
        self.activation = activation

    # nn.Conv2d-like attributes, for code that inspects the layer (e.g. ConvModule, analysis tools).
    in_channels = property(lambda self: self.conv_a.in_channels)
    out_channels = property(lambda self: self.conv_b.out_channels)
    kernel_size = property(lambda self: self.conv_a.kernel_size)
    stride = property(lambda self: self.conv_a.stride)
    padding = property(lambda self: self.conv_a.padding)
    dilation = property(lambda self: self.conv_a.dilation)
    groups = property(lambda self: 1)
    rank = property(lambda self: self.conv_a.out_channels)

    @property
    def bias(self):
        return self.conv_b.bias

    def forward(self, x):
        x = self.conv_b(self.conv_a(x))
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        return f"rank={self.rank}"

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, rank: int) -> "FactorizedConv2d":
        """The factorised layer for ``conv`` at ``rank``, weights uninitialised (to load a checkpoint into)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"can only factorise nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"cannot factorise a grouped conv (groups={conv.groups}); only groups=1 is supported")
        full = min(conv.out_channels, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
        if not 1 <= rank <= full:
            raise ValueError(f"rank must lie in [1, {full}] for a conv of weight shape "
                             f"{tuple(conv.weight.shape)}, got {rank}")
        if isinstance(conv.padding, str):
            raise ValueError(f"string padding {conv.padding!r} is not supported; use explicit padding")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, norm=getattr(conv, "norm", None),
                  activation=getattr(conv, "activation", None))
        return new.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> "FactorizedConv2d":
        """Factorise ``conv`` at ``rank`` (exact when ``conv``'s weight has rank <= ``rank``).

        Keeps stride, padding, dilation, padding mode, bias, and a carried ``norm``/``activation``.
        Rejects ``groups > 1``.
        """
        new = cls.empty_like(conv, rank)
        w = conv.weight.detach()
        n = w.shape[0]
        U, S, Vh = torch.linalg.svd(w.reshape(n, -1).double(), full_matrices=False)
        root = S[:rank].sqrt()
        with torch.no_grad():
            new.conv_a.weight.copy_((root[:, None] * Vh[:rank]).reshape(new.conv_a.weight.shape))
            new.conv_b.weight.copy_((U[:, :rank] * root).reshape(new.conv_b.weight.shape))
            if conv.bias is not None:
                new.conv_b.bias.copy_(conv.bias.detach())
        return new


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _surgery(model: nn.Module, plan: Union[RankPlan, Dict[str, int]],
             make: Callable[[nn.Conv2d, int], FactorizedConv2d]) -> List[str]:
    ranks = plan.ranks if isinstance(plan, RankPlan) else dict(plan)
    todo: List[Tuple[str, FactorizedConv2d]] = []
    for name, rank in ranks.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"planned layer {name!r} is not in the model: the plan does not belong to it") from e
        if isinstance(conv, FactorizedConv2d):
            raise ValueError(f"layer {name!r} is already factorised")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"planned layer {name!r} is a {type(conv).__name__}, not a Conv2d")
        shape = tuple(conv.weight.shape)
        if isinstance(plan, RankPlan) and tuple(plan[name].shape) != shape:
            raise ValueError(f"layer {name!r}: weight shape {shape} differs from the plan's {plan[name].shape}")
        n, c, kh, kw = shape
        if rank * (c * kh * kw + n) >= n * c * kh * kw:
            continue  # two thin convs would cost more: keep the (low-rank) dense conv
        todo.append((name, make(conv, rank)))
    for name, new in todo:  # everything built: now swap, so a failure above changes nothing
        set_submodule(model, name, new)
    logger.info("factorised %d of %d planned layers", len(todo), len(ranks))
    return [n for n, _ in todo]


def factorize_(model: nn.Module, plan: Union[RankPlan, Dict[str, int]]) -> List[str]:
    """Replace each planned conv by a :class:`FactorizedConv2d` where that reduces MACs, in place.

    The new weights come from each conv's SVD, so a conv that was projected to rank ``k`` is
    reproduced exactly (to float round-off). Atomic: all replacements are built before any is installed.

    Returns:
        The names of the layers that were factorised.
    """
    return _surgery(model, plan, FactorizedConv2d.from_conv)


def build_factorized_(model: nn.Module, plan: Union[RankPlan, Dict[str, int]]) -> List[str]:
    """Install uninitialised factorised layers per ``plan`` (same choice as :func:`factorize_`),
    so that a compressed checkpoint's state dict loads into ``model`` with matching keys."""
    return _surgery(model, plan, FactorizedConv2d.empty_like)
