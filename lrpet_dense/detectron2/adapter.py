"""What detectron2 supplies to LRPET (:class:`~lrpet_dense.core.adapter.Adapter`): :data:`ADAPTER`.

Norm lookup (``conv.norm``), default selection (``backbone.*``, and ``roi_heads.res5.*`` in C4 models),
the plan's forward (``model.backbone`` on a zero image padded to its size divisibility; the MAC cut
is a fraction of the backbone's conv MACs, what ``FlopCountAnalysis`` reports as the backbone), the
output tensors (:func:`~lrpet_dense.detectron2.model.output_tensors`), the checkpoint layout
(``{"model": ..., "trainer": {"hooks": {"LRPETHook": ...}}}``; compressed: ``{"model", "lrpet_plan",
"lrpet_factorized", "meta"}``), the counter (``FlopCountAnalysis``) and the ONNX export
(:mod:`lrpet_dense.detectron2.onnx`). Compression, the inference form, checkpoints and planning are
the core's, written once.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from detectron2.layers import Conv2d as D2Conv2d

from lrpet_dense.core.adapter import Adapter, PlanForwards
from lrpet_dense.core.selection import conv_names, eval_mode

from .model import output_tensors
from .pairing import default_include, find_norm, unwrap_model

__all__ = ["Detectron2Adapter", "ADAPTER", "default_plan_hw", "DEFAULT_TEST_SIZE"]

#: detectron2's default ``INPUT.MIN_SIZE_TEST``: the planning input of a model built without a yacs config.
DEFAULT_TEST_SIZE = 800


class Detectron2Adapter(Adapter):
    """LRPET's contract for detectron2 models (``GeneralizedRCNN`` and its subclasses)."""

    name = "detectron2"
    checkpoint_key = "model"
    conv_types = (D2Conv2d,)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model)

    def find_norm(self, name, conv, parent, child):
        return find_norm(name, conv, parent, child)

    def default_include(self, model):
        return default_include(model)

    def default_input_hw(self, model: Optional[nn.Module] = None, cfg: Any = None) -> Tuple[int, int]:
        """``INPUT.MIN_SIZE_TEST`` square of a yacs ``cfg``; without one (e.g. a LazyConfig model), 800
        (detectron2's default test size). ``model`` is not needed (the size is the data's)."""
        if cfg is not None:
            size = int(cfg.INPUT.MIN_SIZE_TEST)
            return size, size
        return DEFAULT_TEST_SIZE, DEFAULT_TEST_SIZE

    def plan_forwards(self, model, input_hw):
        backbone = model.backbone
        h, w = input_hw
        div = int(getattr(backbone, "size_divisibility", 0) or 0)
        if div > 1:  # the ImageList the backbone sees is padded to this
            h, w = (-(-s // div) * div for s in (h, w))
        device = next(backbone.parameters()).device
        return PlanForwards(lambda: backbone(torch.zeros(1, 3, h, w, device=device)), conv_names(model, "backbone."))

    def check_inputs(self, model, input_hw):
        return torch.rand(3, *input_hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255

    def output_tensors(self, model, inputs):
        return output_tensors(model, inputs)

    def training_state(self, checkpoint: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
        return ((checkpoint.get("trainer") or {}).get("hooks") or {}).get("LRPETHook")

    def count_complexity(self, model: nn.Module, input_hw: Tuple[int, int]) -> Dict[str, Dict[str, int]]:
        """Params and MACs of the backbone and the whole model, by detectron2's ``FlopCountAnalysis``.

        Counts one inference of a ``3 x H x W`` image, as detectron2's ``tools/analyze_model.py`` does
        (fvcore counts one "flop" per multiply-accumulate).

        Returns:
            ``{"backbone": {"params", "macs"}, "model": {"params", "macs"}}``.
        """
        from detectron2.utils.analysis import FlopCountAnalysis
        from fvcore.nn import parameter_count

        model = unwrap_model(model)
        h, w = input_hw
        image = (torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255).to(model.device)
        with eval_mode(model):
            flops = FlopCountAnalysis(model, [{"image": image, "height": h, "width": w}])
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_module = flops.by_module()  # keys are prefixed by the TracingAdapter's "model."
        params = parameter_count(model)
        return {"backbone": {"params": int(params.get("backbone", 0)), "macs": int(by_module["model.backbone"])},
                "model": {"params": int(params[""]), "macs": int(flops.total())}}

    def export_onnx(self, model, path, input_hw, *, align_ranks=16):
        from .onnx import export_onnx

        return export_onnx(model, path, input_hw, align_ranks=align_ranks)


#: The detectron2 adapter: the package's ``compress_model_``, ``build_plan``, ... are its methods.
ADAPTER = Detectron2Adapter()


def default_plan_hw(model: Optional[nn.Module] = None, cfg: Any = None) -> Tuple[int, int]:
    """The default input size of the plan, the MAC count and latency: ``INPUT.MIN_SIZE_TEST`` square of a
    yacs ``cfg``, else 800 square (as in :mod:`lrpet_dense.mmseg`: ``default_plan_hw(model, cfg=None)``)."""
    return ADAPTER.default_input_hw(model, cfg)
