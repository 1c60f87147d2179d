"""LRPET on any ``nn.Module`` in a plain PyTorch training loop (torch only; no framework).

The conv -> BatchNorm pairs are found from the model's own forward on an example input (as
Torch-Pruning's ``DependencyGraph.build_dependency(model, example_inputs)`` does): forward hooks
record each conv's output tensor, and a norm module whose input is that very tensor, not modified
in place since (its version counter unchanged), follows that conv. A conv that carries its norm
(``conv.norm``, detectron2 style) is paired with it. A conv whose outputs reach two norms, or a norm
fed by two convs, is ambiguous and an error naming the layer; a conv with no norm right after it is
projected without BN rectification (logged); a conv the example forward never calls is left out
(logged). Layers are chosen as everywhere in lrpet_dense: ``config.include`` / ``config.exclude``
fnmatch patterns over module names (default: every conv) and ``filter_fn(module, fqn)``.

The verbs, in the style of torchao's ``quantize_(model, config, filter_fn)``::

    import lrpet_dense as lrpet
    session = lrpet.prepare(model, example, lrpet.LRPETConfig(target_macs_cut=0.5), total_steps=n)
    for ...:                               # the training loop, unchanged
        ...; optimizer.step(); session.step()
    lrpet.compress_model_(model, session.plan, example)   # factorised, checked in float64
    lrpet.save_compressed(model, "model_lrpet.pth")
    lrpet.load_compressed_(fresh_model, "model_lrpet.pth")  # the plan is in the checkpoint

The MAC cut (``target_macs_cut``) is a fraction of the MACs of every conv the example forward
calls. ``docs/pytorch.md`` has a complete training loop.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .adapter import Adapter, PlanForwards
from .config import LRPETConfig
from .factorize import FactorizedConv2d
from .projection import ConvBN
from .rank import RankPlan
from .selection import FilterFn, Pairing, conv_names, eval_mode, is_batchnorm, pair_with
from .session import LRPETSession

__all__ = ["PlainAdapter", "prepare", "pair_convs", "build_plan", "compress_model_", "to_inference_",
           "save_compressed", "load_compressed_", "plan_from_checkpoint", "count_complexity", "export_onnx"]

logger = logging.getLogger(__name__)

#: The key under which the documented loop saves :meth:`LRPETSession.state_dict` in its checkpoints.
SESSION_KEY = "lrpet"


def _as_call(example_inputs: Any) -> Tuple[tuple, dict]:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    raise TypeError(f"example_inputs must be a tensor, a tuple/list of arguments or a dict of keyword arguments, "
                    f"got {type(example_inputs).__name__}")


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, Mapping):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: BN-like (running statistics, :func:`is_batchnorm`) or one of torch's other norms."""
    return is_batchnorm(module) or isinstance(module, _NORMS)


def _conv_modules(model: nn.Module, factorized: bool) -> Dict[str, nn.Module]:
    """``{name: conv}`` of every conv outside factorised layers (a module registered twice: its first name)."""
    kinds = (nn.Conv2d, FactorizedConv2d) if factorized else (nn.Conv2d,)
    out: Dict[str, nn.Module] = {}
    seen = set()
    for parent_name, parent in model.named_modules():
        if isinstance(parent, FactorizedConv2d):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, kinds) and id(child) not in seen:
                seen.add(id(child))
                out[f"{parent_name}.{child_name}" if parent_name else child_name] = child
    return out


class _Recorded:
    """What one forward of the example showed: which norm follows which conv, and each conv's sizes."""

    def __init__(self) -> None:
        self.norms: Dict[str, Dict[str, nn.Module]] = defaultdict(dict)  # conv -> {norm name: norm}
        self.feeds: Dict[str, set] = defaultdict(set)  # norm name -> convs feeding it
        self.out_sizes: Dict[str, Tuple[int, int]] = {}
        self.in_sizes: Dict[str, Tuple[int, int]] = {}


def record_forward(model: nn.Module, example_inputs: Any, *, factorized: bool = False) -> _Recorded:
    """Run ``model`` once on ``example_inputs`` (eval mode, no grad; BN statistics untouched) and record the
    conv -> norm edges and each conv's input/output size (see the module docs)."""
    convs = _conv_modules(model, factorized)
    conv_ids = {id(m): n for n, m in convs.items()}
    norms = {n: m for n, m in model.named_modules() if n and _is_norm(m) and id(m) not in conv_ids}
    rec = _Recorded()
    produced: Dict[int, Tuple[str, int]] = {}  # id(output tensor) -> (conv name, its version then)
    alive: List[torch.Tensor] = []  # outputs kept alive during the forward, so no id is reused
    handles = []

    def after_conv(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out._version)
                alive.append(out)
                if out.dim() == 4 and name not in rec.out_sizes:
                    rec.out_sizes[name] = (int(out.shape[-2]), int(out.shape[-1]))
                    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                        rec.in_sizes[name] = (int(args[0].shape[-2]), int(args[0].shape[-1]))
        return hook

    def before_norm(name):
        def hook(module, args):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and id(x) in produced:
                conv, version = produced[id(x)]
                if x._version == version:  # the conv's output itself, not changed in place since
                    rec.norms[conv][name] = module
                    rec.feeds[name].add(conv)
        return hook

    args, kwargs = _as_call(example_inputs)
    try:
        for name, m in convs.items():
            handles.append(m.register_forward_hook(after_conv(name)))
        for name, m in norms.items():
            handles.append(m.register_forward_pre_hook(before_norm(name)))
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return rec


class PlainAdapter(Adapter):
    """The adapter for any ``nn.Module``: pairing and sizes from a forward of ``example_inputs``.

    Args:
        example_inputs: what the model is called with (a tensor: ``model(x)``; a tuple: ``model(*x)``; a
            dict: ``model(**x)``), on the model's device: the planning forward and, cast to float64 on
            CPU, the input of the output checks. Defaults to None: only the checkpoint functions
            (:meth:`save_compressed`, :meth:`plan_from_checkpoint`, :meth:`load_state_`) work then.
    """

    name = "torch"
    checkpoint_key = "model"

    def __init__(self, example_inputs: Any = None):
        if example_inputs is not None:
            _as_call(example_inputs)  # checks the type
        self.example_inputs = example_inputs
        self._recorded: Optional[_Recorded] = None

    def _call(self) -> Tuple[tuple, dict]:
        if self.example_inputs is None:
            raise ValueError("this needs the model's example inputs: PlainAdapter(example_inputs)")
        return _as_call(self.example_inputs)

    # -- supplied -------------------------------------------------------------------------------------
    def find_norm(self, name, conv, parent, child):
        norm = getattr(conv, "norm", None)
        if isinstance(norm, nn.Module):  # a conv that carries its norm (detectron2 style)
            return norm, None
        found = self._recorded.norms.get(name, {}) if self._recorded is not None else {}
        if len(found) > 1:
            raise ValueError(f"cannot pair conv {name!r} with one norm: its output goes straight into "
                             f"{sorted(found)}. Leave it out (exclude=[{name!r}]) or give it one norm")
        if not found:
            return None, None
        norm_name, norm = next(iter(found.items()))
        fed = self._recorded.feeds[norm_name]
        if len(fed) > 1:
            raise ValueError(f"cannot pair conv {name!r}: its norm {norm_name!r} also follows {sorted(fed - {name})}, "
                             "so BN rectification (and folding) would be ambiguous. Leave these convs out "
                             f"(exclude=[...]) or give each its own norm")
        return norm, None

    def default_include(self, model):
        return ["*"]

    def default_input_hw(self, model, cfg=None):
        args, kwargs = self._call()
        for t in list(args) + list(kwargs.values()):
            if isinstance(t, torch.Tensor) and t.dim() >= 3:
                return int(t.shape[-2]), int(t.shape[-1])
        raise ValueError("the example inputs hold no image tensor (..., H, W)")

    def plan_forwards(self, model, input_hw):
        if tuple(input_hw) != self.default_input_hw(model):
            raise ValueError(f"plain PyTorch plans on the example input ({self.default_input_hw(model)}); give an "
                             f"example input of the size to plan for instead of plan_input_size={tuple(input_hw)}")
        args, kwargs = self._call()
        return PlanForwards(lambda: model(*args, **kwargs), conv_names(model))

    def check_inputs(self, model, input_hw):
        self._call()
        return _map_tensors(self.example_inputs,
                            lambda t: t.detach().cpu().double() if t.is_floating_point() else t.detach().cpu())

    def output_tensors(self, model, inputs):
        args, kwargs = _as_call(inputs)
        with torch.no_grad():
            return model(*args, **kwargs)

    def training_state(self, checkpoint):
        state = checkpoint.get(SESSION_KEY)
        return state if isinstance(state, Mapping) else None

    def count_complexity(self, model, input_hw=None):
        """Params and MACs of one forward of the example, by torch's own ``FlopCounterMode`` (MACs =
        FLOPs / 2). Returns ``{"model": {"params", "macs"}}`` (a plain model has no "backbone")."""
        from torch.utils.flop_counter import FlopCounterMode

        model = self.unwrap(model)
        args, kwargs = self._call()
        counter = FlopCounterMode(display=False)
        with eval_mode(model), torch.no_grad(), counter:
            model(*args, **kwargs)
        return {"model": {"params": sum(p.numel() for p in model.parameters()),
                          "macs": int(counter.get_total_flops()) // 2}}

    def export_onnx(self, model, path, input_hw=None, *, align_ranks=16):
        """``model(*example)`` to ONNX with torch's dynamo exporter (opset 18), checked in ONNX Runtime
        against PyTorch on the example input; factorised ranks zero-padded to ``align_ranks`` in the file
        (:func:`lrpet_dense.core.export.export_aligned`; ``result["files"]``: the files written)."""
        from .export import export_aligned

        model = self.unwrap(model).eval()
        args, kwargs = self._call()
        if kwargs:
            raise ValueError("ONNX export takes positional example inputs (a tensor or a tuple), not a dict")
        out = export_aligned(model, lambda m: m, args, path, align_ranks=align_ranks, dynamo=True, opset=18)
        return {"inputs": [list(a.shape) for a in args], "outputs": len(out["reference"]), "check": out["check"],
                "aligned": out["aligned"], "files": out["files"]}

    # -- the recorded forward before each pairing ----------------------------------------------------------
    def pair_convs(self, model, config=None, filter_fn=None, *, factorized=False) -> Pairing:
        model = self.unwrap(model)
        self._call()
        self._recorded = record_forward(model, self.example_inputs, factorized=factorized)
        reached = set(self._recorded.out_sizes)
        unreached: List[str] = []

        def keep(conv: nn.Module, name: str) -> bool:
            if name not in reached:
                unreached.append(name)
                return False
            return filter_fn is None or bool(filter_fn(conv, name))

        pairing = pair_with(model, config, keep, self.default_include, self.find_norm, factorized)
        if unreached:
            pairing.notes.append(f"{len(unreached)} selected conv(s) are not called by the example forward and are "
                                 f"left out: {', '.join(unreached[:5])}")
        return pairing


# -- the verbs --------------------------------------------------------------------------------------------
def pair_convs(model: nn.Module, example_inputs: Any, config: Optional[LRPETConfig] = None,
               filter_fn: Optional[FilterFn] = None) -> Pairing:
    """The convs of ``model`` that ``config`` (``include`` / ``exclude``; default every conv) and
    ``filter_fn(module, fqn)`` select, each paired with the BatchNorm right after it in the forward of
    ``example_inputs`` (see the module docs).

    Raises:
        ValueError: a pattern matches no conv; a pairing is ambiguous (names the layer); nothing selected.
    """
    return PlainAdapter(example_inputs).pair_convs(model, config, filter_fn)


def build_plan(model: nn.Module, layers: Sequence[ConvBN], config: LRPETConfig, example_inputs: Any) -> RankPlan:
    """The rank plan of ``layers``: output sizes from the forward of ``example_inputs``; a MAC cut is a
    fraction of the MACs of every conv that forward calls."""
    return PlainAdapter(example_inputs).build_plan(model, layers, config)


def prepare(model: nn.Module, example_inputs: Any, config: Optional[LRPETConfig] = None, *,
            filter_fn: Optional[FilterFn] = None, total_steps: Optional[int] = None,
            train_data: Optional[Tuple[Iterable[Any], Callable[[nn.Module, Any], Any]]] = None) -> LRPETSession:
    """Select, pair and plan: the :class:`~lrpet_dense.core.LRPETSession` a training loop calls.

    Call ``session.step()`` after every ``optimizer.step()`` (it projects every ``config.interval``
    steps, and after step ``total_steps`` when given), ``session.finish()`` at the end when
    ``total_steps`` is not given, and keep ``session.state_dict()`` in your checkpoints for resume.

    Args:
        model: a dense ``nn.Module`` (a DDP wrapper is unwrapped).
        example_inputs: an input of the size to plan for (see :class:`PlainAdapter`).
        config: the options. Defaults to ``LRPETConfig()`` (ratio 0.5, every conv, interval 500).
        filter_fn: ``filter_fn(module, fqn) -> bool`` narrows the selection (torchao's convention).
        total_steps: the run's optimizer steps, when known.
        train_data: ``(batches, forward)``: training batches (e.g. your ``DataLoader``) and ``forward(model,
            batch)`` running the model on one in training mode; after the final projection the BN statistics
            are recomputed on ``config.precise_bn_iters`` of them (:func:`~lrpet_dense.core.recalibrate_bn_`).
            Defaults to None (not recomputed).
    """
    session = PlainAdapter(example_inputs).session(model, config or LRPETConfig(), filter_fn=filter_fn,
                                                   total_steps=total_steps)
    session.train_data = train_data
    return session


def compress_model_(model: nn.Module, plan: RankPlan, example_inputs: Any, *, project: bool = False,
                    config: Optional[LRPETConfig] = None, rtol: float = 1e-4) -> List[str]:
    """Factorise the planned convs in place once checked: the factorised model's outputs on
    ``example_inputs`` must equal the projected dense model's in float64 (see
    :meth:`lrpet_dense.core.adapter.Adapter.compress_model_`). Returns the factorised convs' names."""
    return PlainAdapter(example_inputs).compress_model_(model, plan, project=project, config=config, rtol=rtol)


def to_inference_(model: nn.Module, example_inputs: Any, *, rtol: float = 1e-4) -> nn.Module:
    """BatchNorms folded into the convs and channels_last on CPU, checked in float64 on ``example_inputs``
    (:meth:`lrpet_dense.core.adapter.Adapter.to_inference_`). Inference only."""
    return PlainAdapter(example_inputs).to_inference_(model, rtol=rtol)


_CHECKPOINTS = PlainAdapter()  # the checkpoint layout needs no example input


def save_compressed(model: nn.Module, path: str, meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Write a factorised model: ``{"model": state dict (+ "_lrpet_plan"), "lrpet_plan", "lrpet_factorized",
    "meta"}``, atomically, loadable with ``torch.load(weights_only=True)``."""
    return _CHECKPOINTS.save_compressed(model, path, meta)


def plan_from_checkpoint(checkpoint: Mapping[str, Any]) -> Optional[RankPlan]:
    """The plan a checkpoint dict carries (a compressed model's, or ``checkpoint["lrpet"]`` of the session), or None."""
    return _CHECKPOINTS.plan_from_checkpoint(checkpoint)


def load_compressed_(model: nn.Module, path: str) -> Dict[str, Any]:
    """Load a compressed checkpoint into a freshly built dense ``model`` of the same architecture, in place:
    its factorised convs are built from the checkpoint's plan, then every weight loads strictly.

    Returns:
        The checkpoint dict.

    Raises:
        ValueError: the file is not a compressed checkpoint, or does not fit the model (keys, shapes).
    """
    from lrpet_dense.io import load_checkpoint_safe

    ckpt = load_checkpoint_safe(path)
    if not isinstance(ckpt, Mapping) or not _CHECKPOINTS.is_compressed(ckpt):
        raise ValueError(f"{path!r} is not a compressed LRPET checkpoint (no plan in it); write one with "
                         "save_compressed")
    _CHECKPOINTS.load_state_(model, ckpt, path)
    return ckpt


def count_complexity(model: nn.Module, example_inputs: Any) -> Dict[str, Dict[str, int]]:
    """Params and MACs of one forward of ``example_inputs`` (torch's ``FlopCounterMode``)."""
    return PlainAdapter(example_inputs).count_complexity(model)


def export_onnx(model: nn.Module, path: str, example_inputs: Any, *, align_ranks: int = 16) -> Dict[str, Any]:
    """Export ``model(*example_inputs)`` to ONNX and check it in ONNX Runtime (see :class:`PlainAdapter`)."""
    return PlainAdapter(example_inputs).export_onnx(model, path, align_ranks=align_ranks)
