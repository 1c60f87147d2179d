"""Factorised convs for inference (docs/method.md, section 6) and the model surgery that installs them.

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

import json
import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .macs import factorization_saves, full_rank
from .rank import LayerPlan, RankPlan

__all__ = ["FactorizedConv2d", "factorize_", "enable_compressed_loading_"]

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
    it takes its im2col/GEMM path instead, about half as fast (``benchmarks/README.md`` has the
    figures). The kernel is called directly because no public switch selects it: this is the same
    call PyTorch's own dispatch makes for such convs on several threads, with the same arguments.
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


def is_pointwise(kernel_size, stride, padding, dilation, padding_mode: str) -> bool:
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
        if is_pointwise(kernel_size, stride, padding, dilation, padding_mode):
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
        full = full_rank(conv.weight.shape)
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
        a, b = _top_factors(w.reshape(w.shape[0], -1).double(), rank)
        with torch.no_grad():
            new.conv_a.weight.copy_(a.reshape(new.conv_a.weight.shape))
            new.conv_b.weight.copy_(b.reshape(new.conv_b.weight.shape))
            if conv.bias is not None:
                new.conv_b.bias.copy_(conv.bias.detach())
        return new


def _top_factors(m: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``m`` (``n x d``, float64):
    ``A = S^1/2 V^T`` (``rank x d``), ``B = U S^1/2`` (``n x rank``) of the top singular triplets.

    From the eigendecomposition of the smaller Gram matrix (``m m^T`` or ``m^T m``) instead of a full SVD:
    5-10x faster for ResNet-50's convs, and exact to float64 round-off for the kept triplets, which is what
    factorising an already projected (rank <= ``rank``) weight needs. Directions with a zero singular value
    (a weight of lower rank) get zero factors.
    """
    n, d = m.shape
    left = n <= d
    evals, evecs = torch.linalg.eigh(m @ m.T if left else m.T @ m)  # ascending
    vecs = evecs[:, -rank:].flip(1)
    s = evals[-rank:].flip(0).clamp_min(0).sqrt()
    keep = s > s[0] * 1e-12 if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    root = torch.where(keep, s.sqrt(), torch.zeros_like(s))
    inv_root = torch.where(keep, 1 / s.clamp_min(torch.finfo(s.dtype).tiny).sqrt(), torch.zeros_like(s))
    if left:  # vecs = U: A = S^-1/2 U^T m, B = U S^1/2
        return inv_root[:, None] * (vecs.T @ m), vecs * root
    return root[:, None] * vecs.T, (m @ vecs) * inv_root  # vecs = V: A = S^1/2 V^T, B = m V S^-1/2


# -- model surgery ------------------------------------------------------------------------------------
def _is_bookkeeping(attr: str) -> bool:
    """``nn.Module`` attributes that hold parameters, buffers, children or hooks, not user references."""
    return attr in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set") or "hook" in attr


def _replace_in(container, key, value, old: nn.Module, new: nn.Module, undo: list, depth: int) -> int:
    """Replace ``old`` by ``new`` in ``container[key] = value`` and in lists, tuples and dicts under it."""
    if value is old:
        undo.append((container, key, value))
        container[key] = new
        return 1
    if depth >= 4 or isinstance(value, nn.Module):  # modules are visited on their own
        return 0
    if isinstance(value, list):
        return sum(_replace_in(value, i, v, old, new, undo, depth + 1) for i, v in enumerate(list(value)))
    if isinstance(value, dict):
        return sum(_replace_in(value, k, v, old, new, undo, depth + 1) for k, v in list(value.items()))
    if isinstance(value, tuple):
        items = list(value)
        count = sum(_replace_in(items, i, v, old, new, undo, depth + 1) for i, v in enumerate(value))
        if count:
            rebuilt = type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
            undo.append((container, key, value))
            container[key] = rebuilt
        return count
    return 0


def replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module, undo: list) -> int:
    """Replace every reference to ``old`` that a module of ``root`` holds by ``new``; returns how many.

    Covers registered children (under any number of names) and plain attributes, including lists,
    tuples and dicts of modules kept next to the registered ones: detectron2's ``FPN`` keeps its
    lateral/output convs both as ``fpn_lateral2``... and in the lists ``lateral_convs`` /
    ``output_convs`` that its ``forward`` uses. Each change is recorded in ``undo``.
    """
    count = 0
    for module in list(root.modules()):
        if module is old:
            continue
        for key, child in list(module._modules.items()):
            if child is old:
                undo.append((module._modules, key, child))
                module._modules[key] = new
                count += 1
        for attr, value in list(vars(module).items()):
            if not _is_bookkeeping(attr):
                count += _replace_in(module.__dict__, attr, value, old, new, undo, 0)
    return count


class _ReplacedModuleCalled(RuntimeError):
    pass


def _refuse_replaced_call(name: str):
    def hook(module, args):
        raise _ReplacedModuleCalled(
            f"LRPET: {name!r} was replaced by its factorised form, but the model still calls the original "
            "module through a reference outside the module tree that the surgery could not replace (e.g. a "
            "closure or a non-module object). Its outputs would be wrong, so this stops here; please report "
            "the model type.")
    return hook


def _surgery(model: nn.Module, plan: Union[RankPlan, Dict[str, int]],
             make: Callable[[nn.Conv2d, int], FactorizedConv2d]) -> List[str]:
    ranks = plan.ranks if isinstance(plan, RankPlan) else dict(plan)
    if getattr(model, PLAN_ATTR, None) is not None:
        raise ValueError("the model is already factorised with an LRPET plan; build a fresh model to factorise "
                         "or load another plan")
    todo: List[Tuple[str, nn.Conv2d, FactorizedConv2d]] = []
    shapes: Dict[str, Tuple[int, ...]] = {}
    for name, rank in ranks.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"planned layer {name!r} is not in the model: the plan does not belong to it") from e
        if isinstance(conv, FactorizedConv2d):
            raise ValueError(f"layer {name!r} is already factorised")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"planned layer {name!r} is a {type(conv).__name__}, not a Conv2d")
        shape = shapes[name] = tuple(conv.weight.shape)
        if isinstance(plan, RankPlan) and tuple(plan[name].shape) != shape:
            raise ValueError(f"layer {name!r}: weight shape {shape} differs from the plan's {plan[name].shape}")
        if not factorization_saves(shape, rank):
            continue  # two thin convs would cost more: keep the (low-rank) dense conv
        todo.append((name, conv, make(conv, rank).train(conv.training)))
    # Everything is built: now swap every reference, undoing all of it if anything fails, so a failed
    # surgery leaves the model as it was.
    undo: list = []
    try:
        for name, old, new in todo:
            replace_everywhere(model, old, new, undo)
        present = {id(m) for m in model.modules()}
        stale = [name for name, old, _ in todo if id(old) in present]
        if stale:
            raise RuntimeError(f"model surgery could not replace {stale[:3]} everywhere in the module tree")
    except BaseException:
        for container, key, value in reversed(undo):
            container[key] = value
        raise
    for name, old, _ in todo:  # a forward that still reaches an original conv is an error, not a wrong output
        old.register_forward_pre_hook(_refuse_replaced_call(name))
    if not isinstance(plan, RankPlan):  # a bare {name: rank}: keep what rebuilds the same structure
        plan = RankPlan({n: LayerPlan(n, shapes[n], k, 0.0) for n, k in ranks.items()}, 0.0)
    _attach_plan(model, plan)
    logger.info("factorised %d of %d planned layers", len(todo), len(ranks))
    return [n for n, _, _ in todo]


def factorize_(model: nn.Module, plan: Union[RankPlan, Dict[str, int]], *, from_weights: bool = True) -> List[str]:
    """Replace each planned conv by a :class:`FactorizedConv2d` where that reduces MACs, in place.

    The new weights come from each conv's SVD, so a conv that was projected to rank ``k`` is
    reproduced exactly (to float round-off); with ``from_weights=False`` they are left uninitialised,
    to load a compressed checkpoint into (the structure is the same). Every reference to a replaced conv that a module holds
    (registered or in a plain list/tuple/dict attribute, as detectron2's FPN keeps them) is replaced;
    a forward that still reaches an original conv raises instead of computing with stale weights.
    Atomic: all replacements are built before any is installed, and a failure undoes the swaps.
    Afterwards the model carries the plan (its ``state_dict`` metadata holds it, and
    :func:`enable_compressed_loading_` is on), so checkpoints saved from it load back.

    Returns:
        The names of the layers that were factorised.
    """
    return _surgery(model, plan, FactorizedConv2d.from_conv if from_weights else FactorizedConv2d.empty_like)


# -- compressed checkpoints: the plan travels with the weights ----------------------------------------
#: State-dict key of the rank plan (UTF-8 JSON as a uint8 tensor) in compressed checkpoints.
PLAN_STATE_KEY = "_lrpet_plan"
#: Key of the rank plan (plain data) in the root's state-dict metadata of a factorised model.
PLAN_METADATA_KEY = "lrpet_plan"
#: Prefix of state-dict keys that are notes for people (e.g. a message a stock loader prints among the
#: unexpected keys); the loading pre-hook drops them like the plan's key.
NOTE_STATE_PREFIX = "_lrpet_note"
#: Attribute of a factorised model holding its :class:`RankPlan`.
PLAN_ATTR = "_lrpet_plan"
#: Attribute set on a model whose factorised structure was installed while loading a state dict.
FACTORIZED_ON_LOAD_ATTR = "_lrpet_factorized_on_load"


def plan_to_tensor(plan: RankPlan) -> torch.Tensor:
    """The plan as UTF-8 JSON bytes in a uint8 tensor (survives any state-dict handling)."""
    return torch.tensor(list(json.dumps(plan.to_dict()).encode("utf-8")), dtype=torch.uint8)


def plan_from_tensor(t: torch.Tensor) -> RankPlan:
    return RankPlan.from_dict(json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8")))


def model_plan(model: nn.Module) -> Optional[RankPlan]:
    """The plan a factorised ``model`` was built with, or None for a dense model."""
    return getattr(model, PLAN_ATTR, None)


def _plan_metadata_hook(module: nn.Module, state_dict, prefix: str, local_metadata: dict) -> None:
    plan = getattr(module, PLAN_ATTR, None)
    if plan is not None:
        local_metadata[PLAN_METADATA_KEY] = plan.to_dict()


def _attach_plan(model: nn.Module, plan: RankPlan) -> None:
    object.__setattr__(model, PLAN_ATTR, plan)
    if not getattr(model, "_lrpet_plan_hook", False):
        _register_state_dict_hook(model, _plan_metadata_hook)
        object.__setattr__(model, "_lrpet_plan_hook", True)
    enable_compressed_loading_(model)


def _register_state_dict_hook(model: nn.Module, hook) -> None:
    register = getattr(model, "register_state_dict_post_hook", None)  # torch >= 2.5
    (register or model._register_state_dict_hook)(hook)


def plan_in_state_dict(state_dict: Mapping[str, Any], prefix: str = "",
                       local_metadata: Optional[Mapping[str, Any]] = None) -> Optional[RankPlan]:
    """The rank plan a (compressed) state dict carries, or None.

    Looks at the ``_lrpet_plan`` tensor and at the root metadata (``state_dict._metadata``; or
    ``local_metadata`` when given, as a load hook receives it).
    """
    t = state_dict.get(prefix + PLAN_STATE_KEY)
    if t is not None:
        return plan_from_tensor(t)
    if local_metadata is None:
        local_metadata = (getattr(state_dict, "_metadata", None) or {}).get(prefix[:-1], {})
    data = (local_metadata or {}).get(PLAN_METADATA_KEY)
    return None if data is None else RankPlan.from_dict(data)


def _factorized_ranks(model: nn.Module) -> Dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedConv2d)}


def _planned_factorized(plan: RankPlan) -> Dict[str, int]:
    return {n: lp.rank for n, lp in plan.layers.items() if lp.factorize}


def _install_plan_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    """Before weights are copied: build the factorised convs the state dict's plan asks for."""
    plan = plan_in_state_dict(state_dict, prefix, local_metadata)
    state_dict.pop(prefix + PLAN_STATE_KEY, None)
    for key in [k for k in state_dict if k.startswith(prefix + NOTE_STATE_PREFIX)]:
        state_dict.pop(key)
    have = _factorized_ranks(module)
    if plan is None:
        stray = [k for k in state_dict if k.startswith(prefix) and k.endswith(".conv_a.weight")]
        if stray and not have:
            raise ValueError(f"the state dict has factorised layers ({stray[0]!r}, ...) but no LRPET plan "
                             f"({PLAN_STATE_KEY!r} or metadata {PLAN_METADATA_KEY!r}): it was not written by "
                             "lrpet_dense, or its plan was stripped")
        dense = [n for n in have if prefix + n + ".weight" in state_dict]
        if dense:
            raise ValueError(f"this model is factorised ({len(have)} layers) but the checkpoint is dense (e.g. "
                             f"{prefix + dense[0] + '.weight'!r}); build a fresh model from the config to load it")
        return
    if have:
        if have != _planned_factorized(plan):
            raise ValueError("this model is already factorised with another plan than the checkpoint's; build a "
                             "fresh model from the config to load it")
        return
    try:
        names = factorize_(module, plan, from_weights=False)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the compressed checkpoint does not match this model/config: {e}. Load it with the "
                         "config it was compressed with") from e
    # An optimizer built before this load does not hold the new layers: training would not update them.
    object.__setattr__(module, FACTORIZED_ON_LOAD_ATTR, True)
    logger.info("LRPET: built %d factorised convs from the checkpoint's plan (p=%g) before loading it",
                len(names), plan.ratio)


def check_trainable_(model: nn.Module) -> None:
    """Raise if ``model`` was factorised while a checkpoint was loaded into it and is now being trained.

    Trainers build the optimizer (and DDP) around the model before they load weights, so layers that
    a compressed checkpoint's plan installed at load time are not in the optimizer: "fine-tuning"
    would silently leave them as they are. The LRPET model types call this in training forwards.
    """
    if getattr(model, "_lrpet_bn_folded", False):
        raise RuntimeError("LRPET: this model's BatchNorms were folded into its convs (the inference form from "
                           "lrpet_dense.core.deploy.fold_bn_); train the model before folding")
    if getattr(model, FACTORIZED_ON_LOAD_ATTR, False):
        raise RuntimeError(
            "LRPET: this model was factorised while a compressed checkpoint was loaded into it, after the "
            "optimizer had been built, so training would not update the factorised layers. To fine-tune a "
            "compressed model, build its factorised structure before the optimizer (detectron2: give the "
            "checkpoint as MODEL.WEIGHTS to tools/train_det.py; mmseg / mmdet: the LRPET model type with "
            "factorized_from=CHECKPOINT and load_from=CHECKPOINT, e.g. model=dict(type='LRPETEncoderDecoder', "
            "factorized_from=CHECKPOINT))")


def enable_compressed_loading_(model: nn.Module) -> nn.Module:
    """Let ``model`` load compressed LRPET checkpoints whatever its type. In place; idempotent.

    Registers a ``load_state_dict`` pre-hook on ``model`` (run by ``torch``'s, mmengine's and
    detectron2's loaders alike) that, when the state dict carries a rank plan, first builds the
    factorised convs of the plan (:func:`factorize_` with ``from_weights=False``), so the weights load with no missing or
    unexpected keys. A dense state dict loads as usual into a dense model. Errors: a plan that does
    not fit the model, factorised weights without a plan, a dense state dict into a factorised model.
    """
    if not getattr(model, "_lrpet_loading_enabled", False):
        register = getattr(model, "register_load_state_dict_pre_hook", None)  # torch >= 2.5
        if register is not None:
            register(_install_plan_pre_hook)
        else:
            model._register_load_state_dict_pre_hook(_install_plan_pre_hook, with_module=True)
        object.__setattr__(model, "_lrpet_loading_enabled", True)
    return model


def compressed_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """CPU state dict of a factorised model that carries its plan (tensor key and metadata).

    Raises:
        ValueError: the model is not factorised.
    """
    plan = model_plan(model)
    if plan is None:
        raise ValueError("the model carries no LRPET plan: factorise it first (factorize_)")
    sd = model.state_dict()
    out = OrderedDict((k, v.detach().cpu().clone()) for k, v in sd.items())
    out[PLAN_STATE_KEY] = plan_to_tensor(plan)
    out._metadata = sd._metadata  # type: ignore[attr-defined]
    return out
