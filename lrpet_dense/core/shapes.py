"""Output sizes of convs for planning, measured with forward hooks on a sample input."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .projection import ConvBN
from .rank import LayerSpec

__all__ = ["record_output_sizes", "layer_specs"]


def record_output_sizes(model: nn.Module, names: Sequence[str], run: Callable[[], object]) -> Dict[str, Tuple[int, int]]:
    """Run ``run()`` (a forward pass of ``model``) and return each named module's output ``(H, W)``.

    Modules called several times (or never) are reported at their first call (or not at all).
    Runs under ``torch.no_grad()``; hooks are removed afterwards even on error.
    """
    sizes: Dict[str, Tuple[int, int]] = {}
    handles = []

    def hook(name):
        def fn(_module, _inp, out):
            if name not in sizes and isinstance(out, torch.Tensor) and out.dim() == 4:
                sizes[name] = (int(out.shape[-2]), int(out.shape[-1]))
        return fn

    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(hook(n)))
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return sizes


def layer_specs(layers: Sequence[ConvBN], out_sizes: Optional[Dict[str, Tuple[int, int]]] = None) -> List[LayerSpec]:
    """:class:`LayerSpec` for each conv of ``layers`` (output sizes from ``out_sizes`` where known)."""
    out_sizes = out_sizes or {}
    specs = []
    for name, conv, _ in layers:
        w = conv.weight
        shape = tuple(w.shape) if w.dim() == 4 else tuple(w.shape) + (1, 1)
        specs.append(LayerSpec(name, shape, out_sizes.get(name)))
    return specs
