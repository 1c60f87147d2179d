"""What mmdet supplies to LRPET (:class:`~lrpet_dense.core.adapter.Adapter`): :data:`ADAPTER`.

On the OpenMMLab layer shared with mmseg (:class:`~lrpet_dense.openmmlab.OpenMMLabAdapter`: norm
lookup (sibling ``bnN``, ``Sequential``, ``ConvModule``), default selection (``backbone.*``), the
checkpoint layout, ``load_model``), mmdet supplies: the models it serves (``BaseDetector``), the
LRPET model types (``LRPET<Detector>``), the plan's forward (the backbone on a zero image of the test
size padded to the preprocessor's ``pad_size_divisor``; the MAC cut is a fraction of the backbone's
conv MACs; selected neck or head convs are measured on :func:`~lrpet_dense.mmdet.model.raw_outputs`),
the output tensors (:func:`~lrpet_dense.mmdet.model.raw_outputs`: features, RPN / dense head and ROI
head outputs before NMS), the counter (``mmengine.analysis.get_model_complexity_info`` on the
backbone and on :class:`~lrpet_dense.mmdet.model.RawOutputs`) and the ONNX export
(:mod:`lrpet_dense.mmdet.onnx`). Compression, the inference form, checkpoints and planning are the
core's, written once.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from lrpet_dense.core.adapter import PlanForwards
from lrpet_dense.core.selection import conv_names, eval_mode
from lrpet_dense.openmmlab.adapter import OpenMMLabAdapter, register_adapter

from .model import RawOutputs, counted_proposals, output_tensors, padded_hw, raw_outputs

__all__ = ["MMDetAdapter", "ADAPTER", "default_plan_hw", "DEFAULT_TEST_SIZE",
           "contiguous_op_inputs_"]

#: The planning input side without a config: mmdet's usual test scale (1333, 800) has a short side of 800.
DEFAULT_TEST_SIZE = 800


def _test_scale(cfg: Any) -> Optional[Tuple[int, int]]:
    """The ``Resize`` scale of the config's test pipeline (mmdet's ``(long, short)`` with ``keep_ratio``)."""
    try:
        pipeline = cfg["test_dataloader"]["dataset"]["pipeline"]
    except (KeyError, TypeError):
        return None
    for step in pipeline or []:
        if isinstance(step, Mapping) and step.get("type") == "Resize" and step.get("scale") is not None:
            scale = step["scale"]
            return (int(scale), int(scale)) if isinstance(scale, int) else (int(scale[0]), int(scale[1]))
    return None


def _contiguous_inputs(module: nn.Module, args):
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def contiguous_op_inputs_(model: nn.Module) -> nn.Module:
    """Make every module of mmcv's compiled ops (``mmcv.ops``: ``RoIAlign``, ...) in ``model`` receive
    contiguous (``NCHW``) tensors, whatever memory format the layers before it produce. In place; idempotent."""
    for module in model.modules():
        if type(module).__module__.startswith("mmcv.ops") and not getattr(module, "_lrpet_contiguous", False):
            module.register_forward_pre_hook(_contiguous_inputs)
            object.__setattr__(module, "_lrpet_contiguous", True)
    return model


class MMDetAdapter(OpenMMLabAdapter):
    """LRPET's contract for mmdet detectors (two-stage ``FasterRCNN``-like, single-stage ``RetinaNet``-like)."""

    name = "mmdet"
    package = "lrpet_dense.mmdet"

    def model_bases(self) -> Tuple[type, ...]:
        from mmdet.models.detectors import BaseDetector

        return (BaseDetector,)

    def lrpet_type_name(self, model: nn.Module) -> str:
        """The model's own type if it is an LRPET type, else ``LRPET<type>`` (``LRPETFasterRCNN``, ...)."""
        from lrpet_dense.openmmlab.model import LRPETModelMixin

        name = type(model).__name__
        return name if isinstance(model, LRPETModelMixin) else "LRPET" + name

    def init_model(self, cfg: Any, device: str) -> nn.Module:
        from mmdet.apis import init_detector

        return init_detector(cfg, None, device=device)

    def default_input_hw(self, model: Optional[nn.Module] = None, cfg: Any = None) -> Tuple[int, int]:
        """The square of the short side of the config's test ``Resize`` scale (VOC: 600x600, COCO: 800x800), as
        detectron2's ``INPUT.MIN_SIZE_TEST`` square; without a config, 800x800. ``model`` is not needed."""
        scale = _test_scale(cfg) if cfg is not None and hasattr(cfg, "get") and not isinstance(cfg, nn.Module) \
            else None
        side = min(scale) if scale else DEFAULT_TEST_SIZE
        return side, side

    def plan_forwards(self, model, input_hw):
        h, w = padded_hw(model, input_hw)
        param = next(model.backbone.parameters())
        x = torch.zeros(1, 3, h, w, device=param.device, dtype=param.dtype)
        return PlanForwards(lambda: model.backbone(x), conv_names(model, "backbone."), lambda: raw_outputs(model, x))

    def check_inputs(self, model, input_hw):
        return torch.randn(1, 3, *input_hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def output_tensors(self, model, inputs):
        return output_tensors(model, inputs)

    def count_complexity(self, model: nn.Module, input_hw: Tuple[int, int]) -> Dict[str, Dict[str, int]]:
        """Params and MACs from ``mmengine.analysis.get_model_complexity_info`` on one preprocessed image of
        ``input_hw`` padded to the preprocessor's divisor.

        Returns:
            ``{'backbone': {'params', 'macs'}, 'model': {'params', 'macs'}}``; the model is backbone, neck
            and heads up to their raw outputs (RPN and ROI head with :func:`counted_proposals` proposals,
            or the dense head); post-processing (box decoding, NMS) is not counted.
        """
        from mmengine.analysis import get_model_complexity_info

        model = self.unwrap(model)
        h, w = padded_hw(model, input_hw)
        param = next(model.parameters())
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
        out = {}
        with eval_mode(model):
            for key, module in (("backbone", model.backbone), ("model", RawOutputs(model, counted_proposals(model)))):
                info = get_model_complexity_info(module, inputs=(x,), show_table=False, show_arch=False)
                out[key] = {"params": int(info["params"]), "macs": int(info["flops"])}
        return out

    def to_inference_(self, model: nn.Module, *, check_hw: Optional[Tuple[int, int]] = None,
                      rtol: float = 1e-4) -> nn.Module:
        """As :meth:`Adapter.to_inference_` (BatchNorms folded, ``channels_last`` weights, checked in float64),
        and mmcv's compiled ops (``RoIAlign``) get contiguous inputs: their CPU kernels read an ``NCHW``
        layout, and the ``channels_last`` convs hand them ``NHWC`` features in float32 (the float64 check
        does not see it: its convs return ``NCHW``)."""
        contiguous_op_inputs_(self.unwrap(model))
        return super().to_inference_(model, check_hw=check_hw, rtol=rtol)

    def export_onnx(self, model, path, input_hw, *, align_ranks=16):
        from .onnx import export_onnx

        return export_onnx(model, path, input_hw, align_ranks=align_ranks)


#: The mmdet adapter: the package's ``compress_model_``, ``build_plan``, ... are its methods.
ADAPTER = register_adapter(MMDetAdapter())


def default_plan_hw(model: Optional[nn.Module] = None, cfg: Any = None) -> Tuple[int, int]:
    """The default input size of the plan, the MAC count and latency: the square of the short side of the
    config's test ``Resize`` scale, else 800x800 (as :mod:`lrpet_dense.detectron2` and
    :mod:`lrpet_dense.mmseg`: ``default_plan_hw(model, cfg=None)``)."""
    return ADAPTER.default_input_hw(model, cfg)
