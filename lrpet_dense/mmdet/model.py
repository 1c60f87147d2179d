"""The mmdet model side of LRPET: the LRPET detector types and the raw outputs every surgery is checked on.

:class:`LRPETFasterRCNN` and :class:`LRPETRetinaNet` (registered in mmdet's ``MODELS``) are mmdet's
``FasterRCNN`` and ``RetinaNet`` that load compressed LRPET checkpoints
(:class:`lrpet_dense.openmmlab.LRPETModelMixin`): ``mmdet.apis.init_detector``, ``tools/test.py`` and
``load_from`` build the factorised convs of the checkpoint's plan before its weights load. Another
detector becomes an LRPET type the same way::

    @MODELS.register_module()
    class LRPETFCOS(LRPETModelMixin, FCOS):
        pass

:func:`raw_outputs` returns a detector's tensors before any discrete step (score thresholds, NMS,
top-k): the backbone's and neck's features, the RPN head's or dense head's per-level class scores
and box deltas, and the ROI head's class scores and box deltas for fixed proposals (so two models
see the same ROIs).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from mmdet.models.detectors import FasterRCNN, RetinaNet
from mmdet.registry import MODELS
from torch import nn

from lrpet_dense.openmmlab.model import LRPETModelMixin
from lrpet_dense.openmmlab.pairing import unwrap_model

__all__ = ["LRPETFasterRCNN", "LRPETRetinaNet", "raw_outputs", "output_tensors", "fixed_rois", "RawOutputs",
           "flat_tensors", "counted_proposals", "padded_hw", "pooled_rois"]


@MODELS.register_module()
class LRPETFasterRCNN(LRPETModelMixin, FasterRCNN):
    """mmdet's ``FasterRCNN`` that also loads compressed LRPET checkpoints (``factorized_from=``: built
    factorised, to fine-tune one); dense, it is exactly a ``FasterRCNN``."""


@MODELS.register_module()
class LRPETRetinaNet(LRPETModelMixin, RetinaNet):
    """mmdet's ``RetinaNet`` that also loads compressed LRPET checkpoints (``factorized_from=``: built
    factorised, to fine-tune one); dense, it is exactly a ``RetinaNet``."""


#: Proposals per image of a two-stage detector counted when its ``test_cfg`` names none.
DEFAULT_PROPOSALS = 1000


def counted_proposals(model: nn.Module) -> int:
    """The proposals per image a two-stage detector's ROI head sees at test time (``test_cfg.rpn.max_per_img``,
    else 1000), as the MAC count and the export use them; 0 without an ROI head."""
    if getattr(model, "roi_head", None) is None:
        return 0
    rpn = (getattr(model, "test_cfg", None) or {}).get("rpn") or {}
    return int(rpn.get("max_per_img", DEFAULT_PROPOSALS))


def padded_hw(model: nn.Module, input_hw: Tuple[int, int]) -> Tuple[int, int]:
    """``input_hw`` padded as the model's data preprocessor pads a batch (``pad_size_divisor``)."""
    div = int(getattr(getattr(model, "data_preprocessor", None), "pad_size_divisor", 1) or 1)
    return tuple(-(-int(s) // div) * div for s in input_hw)  # type: ignore[return-value]


def fixed_rois(h: int, w: int, num: int = 29, *, dtype: torch.dtype = torch.float32,
               device: Any = None) -> torch.Tensor:
    """``num`` fixed proposals over an ``h x w`` image as mmdet's ROI layout ``(batch index 0, x1, y1, x2, y2)``:
    3 scales x 3 x 3 positions, the whole image and a 2 x 2 pixel box (so every FPN level a box of this
    image can map to, and a box smaller than a feature cell, are covered), repeated with slightly larger
    boxes up to ``num``."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    boxes = []
    while len(boxes) < num:
        grow = 1.0 + 0.05 * (len(boxes) // 29)
        for frac in (0.25, 0.5, 0.8):
            bh, bw = min(frac * grow, 0.95) * h, min(frac * grow, 0.95) * w
            for cy in (0.3, 0.5, 0.7):
                for cx in (0.3, 0.5, 0.7):
                    y0, x0 = max(0.0, cy * h - bh / 2), max(0.0, cx * w - bw / 2)
                    boxes.append([0.0, x0, y0, min(w - 1.0, x0 + bw), min(h - 1.0, y0 + bh)])
        boxes.append([0.0, 0.0, 0.0, w - 1.0, h - 1.0])
        boxes.append([0.0, 0.4 * w, 0.4 * h, 0.4 * w + 2.0, 0.4 * h + 2.0])
    return torch.tensor(boxes[:num], dtype=dtype, device=device)


def pooled_rois(extractor: nn.Module, feats, rois: torch.Tensor) -> torch.Tensor:
    """What mmdet's ``SingleRoIExtractor`` computes for ``rois``, without data-dependent branches (for tracing).

    mmdet's forward pools each level's ROIs only when the level has any (``nonzero`` and an ``if``): a
    trace keeps the levels of the traced ROIs alone, so a graph traced on small boxes would pool
    larger ones from no level. Here every level pools every ROI (the others zeroed) and a mask keeps
    each ROI's own level; the pooling is torchvision's ``roi_align`` (the same operation as mmcv's
    ``RoIAlign``, with an ONNX export of the aligned mode at opset 16).
    """
    from torchvision.ops import roi_align

    rois = rois.type_as(feats[0])
    num_levels = len(extractor.roi_layers)
    levels = extractor.map_roi_levels(rois, num_levels) if num_levels > 1 else torch.zeros_like(rois[:, 0]).long()
    out = None
    for i, layer in enumerate(extractor.roi_layers):
        if getattr(layer, "pool_mode", "avg") != "avg":
            raise ValueError(f"RoI layer {i} pools with mode {layer.pool_mode!r}; only 'avg' (RoIAlign's default) is "
                             "exported")
        keep = (levels == i).to(rois.dtype)
        pooled = roi_align(feats[i], rois * keep[:, None], layer.output_size, layer.spatial_scale,
                           max(int(layer.sampling_ratio), 0), bool(layer.aligned))
        pooled = pooled * keep[:, None, None, None]
        out = pooled if out is None else out + pooled
    return out


def _roi_predictions(model: nn.Module, feats, rois: torch.Tensor, traceable: bool = False):
    """The ROI head's class scores and box deltas for ``rois`` (what ``StandardRoIHead`` computes for them);
    ``traceable``: the ROI features by :func:`pooled_rois` (for export)."""
    head = model.roi_head
    extractor = head.bbox_roi_extractor
    feats = feats[:extractor.num_inputs]
    pooled = pooled_rois(extractor, feats, rois) if traceable else extractor(feats, rois)
    if getattr(head, "with_shared_head", False):
        pooled = head.shared_head(pooled)
    return head.bbox_head(pooled)


def raw_outputs(model: nn.Module, inputs: torch.Tensor, rois: Optional[torch.Tensor] = None, *,
                traceable: bool = False) -> Dict[str, Any]:
    """A detector's tensors before any discrete step, for a preprocessed ``N x 3 x H x W`` batch ``inputs``.

    ``features`` (the neck's, or the backbone's without a neck); ``rpn``: the RPN head's per-level
    objectness and deltas; ``roi``: the ROI head's class scores and deltas for ``rois`` (default: 27
    fixed boxes, :func:`fixed_rois`); ``dense_head``: a single-stage head's per-level class scores and
    deltas (and any further per-level outputs). Works on any dtype (e.g. a float64 copy). ``traceable``:
    the ROI features without data-dependent branches (:func:`pooled_rois`), for tracing and export.
    """
    model = unwrap_model(model)
    feats = model.extract_feat(inputs)
    out: Dict[str, Any] = {"features": list(feats)}
    if getattr(model, "rpn_head", None) is not None:
        out["rpn"] = model.rpn_head(feats)
    if getattr(model, "roi_head", None) is not None and getattr(model.roi_head, "with_bbox", False):
        if rois is None:
            rois = fixed_rois(int(inputs.shape[-2]), int(inputs.shape[-1]), dtype=inputs.dtype, device=inputs.device)
        out["roi"] = _roi_predictions(model, feats, rois, traceable)
    if getattr(model, "bbox_head", None) is not None:
        out["dense_head"] = model.bbox_head(feats)
    return out


def output_tensors(model: nn.Module, inputs: torch.Tensor) -> Dict[str, Any]:
    """:func:`raw_outputs` without gradients, e.g. to compare two models in float64."""
    with torch.no_grad():
        return raw_outputs(model, inputs)


class RawOutputs(nn.Module):
    """A detector as ``image -> flat tuple of its raw output tensors`` (:func:`raw_outputs`) with ``num_rois``
    fixed proposals for a two-stage detector's ROI head (0: the default 27): what the counter traces and
    ONNX exports (mmdet's post-processing stays in PyTorch)."""

    def __init__(self, model: nn.Module, num_rois: int = 27):
        super().__init__()
        self.model = unwrap_model(model)
        self.num_rois = int(num_rois)

    def forward(self, inputs: torch.Tensor):
        rois = fixed_rois(int(inputs.shape[-2]), int(inputs.shape[-1]), self.num_rois, dtype=inputs.dtype,
                          device=inputs.device) if self.num_rois > 0 else None
        return tuple(flat_tensors(raw_outputs(self.model, inputs, rois)))


def flat_tensors(out: Any) -> list:
    """The tensors of a nested structure (dicts in insertion order, lists, tuples), depth first."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    return [t for v in values for t in flat_tensors(v)]
