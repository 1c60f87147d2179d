"""What mmseg supplies to LRPET (:class:`~lrpet_dense.core.adapter.Adapter`): :data:`ADAPTER`.

On the OpenMMLab layer shared with mmdet (:class:`~lrpet_dense.openmmlab.OpenMMLabAdapter`: norm
lookup (sibling ``bnN``, ``Sequential``, ``ConvModule``), default selection (``backbone.*``), the
checkpoint layout, ``load_model``), mmseg supplies the plan's forward (the backbone on a zero crop-size input; the MAC cut is a fraction of all the backbone's
conv MACs; selected convs outside it are measured on a ``mode='tensor'`` forward of the whole model),
the output tensors (the logits, ``mode='tensor'``), the model type (``LRPETEncoderDecoder``), the counter (``mmengine.analysis.get_model_complexity_info``) and
the ONNX export (:mod:`lrpet_dense.mmseg.onnx`). Compression, the inference form, checkpoints and
planning are the core's, written once.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from lrpet_dense.core.adapter import PlanForwards
from lrpet_dense.core.selection import conv_names, eval_mode
from lrpet_dense.openmmlab.adapter import CHECKPOINT_KEY, PLAN_KEY, OpenMMLabAdapter, register_adapter

__all__ = ["MMSegAdapter", "ADAPTER", "default_plan_hw", "output_tensors", "CHECKPOINT_KEY", "PLAN_KEY"]

#: The planning input when the segmentor has no crop size.
DEFAULT_CROP = (512, 512)


def output_tensors(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The segmentor's logits (``mode='tensor'``, before the argmax) for an ``N x 3 x H x W`` batch ``inputs``,
    e.g. to compare two models in float64."""
    with torch.no_grad():
        return model(inputs, mode="tensor")


class MMSegAdapter(OpenMMLabAdapter):
    """LRPET's contract for mmseg segmentors (``EncoderDecoder`` and its subclasses)."""

    name = "mmseg"
    package = "lrpet_dense.mmseg"

    def model_bases(self) -> Tuple[type, ...]:
        from mmseg.models.segmentors import BaseSegmentor

        return (BaseSegmentor,)

    def lrpet_type_name(self, model: nn.Module) -> str:
        """``LRPETEncoderDecoder`` (the LRPET type of mmseg's ``EncoderDecoder``)."""
        return "LRPETEncoderDecoder"

    def init_model(self, cfg: Any, device: str) -> nn.Module:
        from mmseg.apis import init_model

        return init_model(cfg, None, device=device)

    def default_input_hw(self, model: Optional[nn.Module] = None, cfg: Any = None) -> Tuple[int, int]:
        """The segmentor's crop size (``data_preprocessor.size``; from ``cfg.model`` when no model is
        given), else 512x512."""
        preprocessor = getattr(self.unwrap(model), "data_preprocessor", None) if model is not None else \
            ((cfg or {}).get("model") or {}).get("data_preprocessor")
        size = (preprocessor.get("size") if isinstance(preprocessor, Mapping) else getattr(preprocessor, "size", None))
        size = size or DEFAULT_CROP
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def plan_forwards(self, model, input_hw):
        param = next(model.backbone.parameters())
        x = torch.zeros(1, 3, *input_hw, device=param.device, dtype=param.dtype)
        return PlanForwards(lambda: model.backbone(x), conv_names(model, "backbone."),
                            lambda: model(x, mode="tensor"))

    def check_inputs(self, model, input_hw):
        return torch.randn(1, 3, *input_hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def output_tensors(self, model, inputs):
        return output_tensors(model, inputs)

    def count_complexity(self, model: nn.Module, input_hw: Tuple[int, int]) -> Dict[str, Dict[str, int]]:
        """Params and MACs from ``mmengine.analysis.get_model_complexity_info``.

        Returns:
            ``{'backbone': {'params', 'macs'}, 'model': {'params', 'macs'}}`` (the whole model in
            ``mode='tensor'``, i.e. backbone + decode head, no auxiliary head at inference).
        """
        from mmengine.analysis import get_model_complexity_info

        model = self.unwrap(model)
        shape = (3, int(input_hw[0]), int(input_hw[1]))
        out = {}
        with eval_mode(model):
            for key, module in (("backbone", model.backbone), ("model", model)):
                info = get_model_complexity_info(module, input_shape=shape, show_table=False, show_arch=False)
                out[key] = {"params": int(info["params"]), "macs": int(info["flops"])}
        return out

    def export_onnx(self, model, path, input_hw, *, align_ranks=16):
        from .onnx import export_onnx

        return export_onnx(model, path, input_hw, align_ranks=align_ranks)


#: The mmseg adapter: the package's ``compress_model_``, ``build_plan``, ... are its methods.
ADAPTER = register_adapter(MMSegAdapter())


def default_plan_hw(model: Optional[nn.Module] = None, cfg: Any = None) -> Tuple[int, int]:
    """The default input size of the plan, the MAC count and latency: the crop size
    (``data_preprocessor.size`` of the model, or of ``cfg.model``), else 512x512 (as in
    :mod:`lrpet_dense.detectron2`: ``default_plan_hw(model, cfg=None)``)."""
    return ADAPTER.default_input_hw(model, cfg)
