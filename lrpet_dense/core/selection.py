"""Which convs a model's LRPET run projects, and what the planner needs to know about them.

Both framework adapters select layers the same way (:func:`select_convs`): every ungrouped
``nn.Conv2d`` whose name matches an ``include`` pattern and no ``exclude`` pattern (fnmatch, ``*``
spans dots) and, optionally, ``filter_fn(module, fqn)``; convs with frozen weights are left out
unless asked for. Only the pairing of a conv with the BatchNorm after it differs between
frameworks: the adapter passes a ``find_norm`` function (:class:`~lrpet_dense.core.adapter.Adapter`). The planner's inputs (output sizes from
one dummy forward, the reference MACs) are measured here too.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .factorize import FactorizedConv2d
from .macs import conv_macs
from .projection import ConvBN
from .rank import LayerSpec, match_any, select_names

__all__ = ["Pairing", "FilterFn", "is_batchnorm"]

logger = logging.getLogger(__name__)

#: ``filter_fn(module, fully_qualified_name) -> bool``: keep a conv (torchao's convention).
FilterFn = Callable[[nn.Module, str], bool]
#: ``find_norm(name, conv, parent, child_name) -> (the norm after the conv or None, note or None)``: the
#: framework's norm lookup. Any norm may be returned; :func:`select_convs` pairs only BatchNorms with
#: running statistics (:func:`is_batchnorm`) and notes any other norm.
FindNorm = Callable[[str, nn.Conv2d, nn.Module, str], Tuple[Optional[nn.Module], Optional[str]]]


def is_batchnorm(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` is a BatchNorm with running statistics, the kind BN rectification uses.

    torch's BN and SyncBN (with ``track_running_stats``), detectron2's ``FrozenBatchNorm2d`` and
    mmcv's ``SyncBatchNorm`` (which does not derive from torch's) qualify: a module holding
    ``running_mean``, ``running_var`` and ``eps``; instance norms (per-sample statistics) do not.
    """
    if module is None or isinstance(module, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
        return False
    return (getattr(module, "running_var", None) is not None and getattr(module, "running_mean", None) is not None
            and hasattr(module, "eps"))


@dataclass
class Pairing:
    """The selected convs of a model, each with the BatchNorm that follows it, and what was left out.

    Attributes:
        layers: ``(name, conv, bn)`` triples to project, in module order (``bn`` None: no BN
            rectification for that conv).
        frozen_skipped: selected convs left out because their weights are frozen.
        notes: convs left out or paired without BN for a reason worth a warning (a grouped conv,
            a norm that is not a BatchNorm with running statistics).
    """

    layers: List[ConvBN]
    frozen_skipped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def names(self) -> List[str]:
        return [l.name for l in self.layers]

    @property
    def unpaired(self) -> List[str]:
        """Selected convs without a BatchNorm (projected without BN rectification)."""
        return [l.name for l in self.layers if l.bn is None]

    def log(self, log: Optional[logging.Logger] = None) -> None:
        """Log the selection: counts, BN pairing, frozen convs left out, and the notes."""
        log = log or logger
        with_bn = len(self.layers) - len(self.unpaired)
        log.info("LRPET selection: %d convs (%d paired with a BatchNorm for rectification, %d without)",
                 len(self.layers), with_bn, len(self.unpaired))
        if self.unpaired:
            log.info("LRPET: projected without BN rectification (no BatchNorm after them): %s",
                     ", ".join(self.unpaired))
        if self.frozen_skipped:
            log.info("LRPET: %d frozen convs are not projected (no gradient: projecting them would truncate "
                     "them for good; include_frozen projects them): %s", len(self.frozen_skipped),
                     ", ".join(self.frozen_skipped))
        for note in self.notes:
            log.warning("LRPET pairing: %s", note)


def _convs(model: nn.Module, factorized: bool = False) -> Iterator[Tuple[str, nn.Module, nn.Module, str]]:
    """``(name, conv, parent, child name)`` of every ``nn.Conv2d`` outside factorised layers (and, with
    ``factorized``, of every :class:`FactorizedConv2d` as one conv)."""
    kinds = (nn.Conv2d, FactorizedConv2d) if factorized else (nn.Conv2d,)
    for parent_name, parent in model.named_modules():
        if isinstance(parent, FactorizedConv2d):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, kinds):
                yield (f"{parent_name}.{child_name}" if parent_name else child_name), child, parent, child_name


def conv_names(model: nn.Module, prefix: str = "") -> List[str]:
    """Names of every conv of ``model`` (grouped ones too) under ``prefix`` (e.g. ``"backbone."``)."""
    return [n for n, _, _, _ in _convs(model) if n.startswith(prefix)]


def pair_with(model: nn.Module, config, filter_fn: Optional[FilterFn], default_include: Callable[[nn.Module], List[str]],
              find_norm: FindNorm, factorized: bool = False) -> Pairing:
    """:func:`select_convs` with ``config``'s ``include`` (empty: ``default_include(model)``), ``exclude``
    and ``include_frozen``: what each adapter's ``pair_convs`` does with its own ``find_norm``."""
    from .config import LRPETConfig

    config = config or LRPETConfig()
    include = list(config.include) or default_include(model)
    return select_convs(model, include, config.exclude, include_frozen=config.include_frozen, filter_fn=filter_fn,
                        find_norm=find_norm, factorized=factorized)


def select_convs(model: nn.Module, include: Sequence[str], exclude: Sequence[str] = (), *,
                 include_frozen: bool = False, filter_fn: Optional[FilterFn] = None,
                 find_norm: FindNorm, factorized: bool = False) -> Pairing:
    """Select convs by name (and ``filter_fn``) and pair each with its BatchNorm (``find_norm``).

    Raises:
        ValueError: an include pattern matches no conv, or only grouped ones; a BatchNorm has another
            channel count than its conv; nothing is selected.
    """
    found = {}
    for name, conv, parent, child in _convs(model, factorized):
        found.setdefault(name, (conv, parent, child))  # a conv registered twice counts once
    grouped = {n: c.groups for n, (c, _, _) in found.items() if c.groups != 1}
    plain = [n for n in found if n not in grouped]
    for p in include:  # a pattern that names only grouped convs asks for what LRPET cannot do
        hits = [n for n in grouped if match_any(n, [p])]
        if hits and not any(match_any(n, [p]) for n in plain):
            raise ValueError(f"include pattern {p!r} selects only grouped/depthwise convs (e.g. {hits[0]!r}, "
                             f"groups={grouped[hits[0]]}); LRPET projects groups=1 convs only. Remove the pattern")
    notes = [f"{n}: grouped conv (groups={g}) cannot be projected; left out" for n, g in grouped.items()
             if match_any(n, include) and not match_any(n, exclude)]
    layers, frozen = [], []
    for name in select_names(plain, include, exclude):
        conv, parent, child = found[name]
        if filter_fn is not None and not filter_fn(conv, name):
            continue
        if not include_frozen and not conv.weight.requires_grad:
            frozen.append(name)
            continue
        bn, note = find_norm(name, conv, parent, child)
        if note:
            notes.append(note)
        if bn is not None and not is_batchnorm(bn):
            notes.append(f"{name}: norm {type(bn).__name__} is not a BatchNorm with running statistics, so BN "
                         "rectification does not apply; projected without it")
            bn = None
        if bn is not None:
            width = getattr(bn, "running_var", None)
            width = width.numel() if width is not None else getattr(bn, "num_features", conv.out_channels)
            if width != conv.out_channels:
                # Not a model this conv can run in: say so now rather than mis-rectify or fail mid-training.
                raise ValueError(f"layer {name!r}: its BatchNorm {type(bn).__name__} has {width} channels but the "
                                 f"conv has {conv.out_channels} output channels; fix the model, or leave the layer "
                                 "out with exclude")
        layers.append(ConvBN(name, conv, bn))
    if not layers:
        raise ValueError(f"LRPET selected no convs to project (include={list(include)}, exclude={list(exclude)}, "
                         f"{len(frozen)} frozen left out)")
    return Pairing(layers, frozen, notes)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (all submodules) in eval mode for the block; restore each one's mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def output_sizes(model: nn.Module, names: Sequence[str], run: Callable[[], object],
                 inputs: Optional[Dict[str, Tuple[int, int]]] = None) -> Dict[str, Tuple[int, int]]:
    """Each named module's output ``(H, W)`` in ``run()`` (a forward of ``model``), at its first call.

    Runs in eval mode (BatchNorm statistics untouched) under ``torch.no_grad``; hooks are removed
    afterwards even on error. Modules never called are left out. The input sizes go to ``inputs``
    when a dict is given.
    """
    sizes: Dict[str, Tuple[int, int]] = {}
    handles = []

    def hook(name):
        def fn(_module, inp, out):
            if name not in sizes and isinstance(out, torch.Tensor) and out.dim() == 4:
                sizes[name] = (int(out.shape[-2]), int(out.shape[-1]))
                if inputs is not None and inp and isinstance(inp[0], torch.Tensor):
                    inputs[name] = (int(inp[0].shape[-2]), int(inp[0].shape[-1]))
        return fn

    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(hook(n)))
        with eval_mode(model), torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return sizes


def layer_specs(layers: Sequence[ConvBN], sizes: Optional[Dict[str, Tuple[int, int]]] = None) -> List[LayerSpec]:
    """:class:`~lrpet_dense.core.LayerSpec` of each conv of ``layers`` (output sizes where known)."""
    sizes = sizes or {}
    specs = []
    for name, conv, _ in layers:
        w = conv.weight
        shape = tuple(w.shape) if w.dim() == 4 else tuple(w.shape) + (1, 1)
        specs.append(LayerSpec(name, shape, sizes.get(name)))
    return specs


def conv_macs_of(model: nn.Module, names: Sequence[str], sizes: Dict[str, Tuple[int, int]]) -> int:
    """Analytic MACs of the named convs whose output size is known (the plan's reference MACs)."""
    return sum(conv_macs(tuple(model.get_submodule(n).weight.shape), sizes[n]) for n in names if n in sizes)


def plan_layers(model: nn.Module, layers: Sequence[ConvBN], config, sizes: Dict[str, Tuple[int, int]],
                reference_names: Sequence[str], in_sizes: Optional[Dict[str, Tuple[int, int]]] = None):
    """The rank plan of ``layers``: output ``sizes`` measured by the adapter, the MAC cut a fraction of
    the convs ``reference_names`` (e.g. the whole backbone's), the singular values for the energy policy,
    and, for a latency plan (``config.target_latency_cut`` / ``latency_table``), the per-layer latency
    table measured on the layers' device at their input sizes ``in_sizes`` (or read from the cache)."""
    from .projection import layer_spectra
    from .rank import build_rank_plan

    specs = layer_specs(layers, sizes)
    spectra = layer_spectra(layers, [s.name for s in specs], config) if config.rank_policy == "energy" else None
    latency = None
    if config.target_latency_cut is not None or config.latency_table is not None:
        from .latency import measure_latency_table

        latency = measure_latency_table(layers, in_sizes or {}, step=max(8, config.rank_multiple),
                                        cache=config.latency_table)
    return build_rank_plan(specs, config, reference_macs=conv_macs_of(model, reference_names, sizes),
                           spectra=spectra, latency=latency)
