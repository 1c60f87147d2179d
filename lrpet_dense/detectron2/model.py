"""The detectron2 model side of LRPET: the ``LRPETGeneralizedRCNN`` meta architecture and the
detector's output tensors that every model surgery is checked on.

:class:`LRPETGeneralizedRCNN` is a ``GeneralizedRCNN`` registered in ``META_ARCH_REGISTRY`` that loads
compressed checkpoints (its factorised convs are built from the checkpoint's plan before the weights
load), so detectron2's own ``DefaultPredictor`` loads them too; the LRPET configs set it.
:func:`output_tensors` returns the detector's tensors before any discrete step (NMS, top-k,
thresholds): backbone features, RPN logits and deltas, box-head scores and deltas for fixed proposals.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn

from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from lrpet_dense.core import enable_compressed_loading_
from lrpet_dense.core.factorize import check_trainable_

from .pairing import unwrap_model

__all__ = ["LRPETGeneralizedRCNN", "output_tensors", "box_predictions"]


@META_ARCH_REGISTRY.register()
class LRPETGeneralizedRCNN(GeneralizedRCNN):
    """:class:`~detectron2.modeling.GeneralizedRCNN` that also loads compressed LRPET checkpoints.

    Identical to ``GeneralizedRCNN`` (same modules, same state dict keys, same forward) for dense
    weights; a compressed state dict (see module docs) first rebuilds its factorised convs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        enable_compressed_loading_(self)

    def forward(self, batched_inputs):
        if self.training:
            check_trainable_(self)  # not silently "fine-tuning" layers the optimizer does not hold
        return super().forward(batched_inputs)


def _fixed_boxes(h: int, w: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A fixed set of proposals spread over an ``h x w`` image: 3 scales x 3 x 3 positions."""
    boxes = []
    for frac in (0.25, 0.5, 0.8):
        bh, bw = frac * h, frac * w
        for cy in (0.3, 0.5, 0.7):
            for cx in (0.3, 0.5, 0.7):
                y0, x0 = max(0.0, cy * h - bh / 2), max(0.0, cx * w - bw / 2)
                boxes.append([x0, y0, min(w - 1.0, x0 + bw), min(h - 1.0, y0 + bh)])
    return torch.tensor(boxes, dtype=dtype, device=device)


def output_tensors(model: nn.Module, inputs: torch.Tensor) -> Dict[str, Any]:
    """The detector's tensors before any discrete step (NMS, top-k, thresholds), for one image.

    Backbone features; RPN objectness logits and anchor deltas; box-head class scores and box deltas
    for a fixed set of proposals (so both models see the same ROIs). Run it on two models (e.g. in
    float64) and compare with :func:`~lrpet_dense.core.compare_outputs`.

    Args:
        model: a ``GeneralizedRCNN`` (C4 ``Res5ROIHeads`` or FPN ``StandardROIHeads``), in eval mode.
        inputs: one ``3 x H x W`` image tensor in the model's input format (0-255), any float dtype.
    """
    image = inputs
    from detectron2.structures import Boxes

    model = unwrap_model(model)
    with torch.no_grad():
        images = model.preprocess_image([{"image": image.to(model.device)}])
        x = images.tensor
        features = model.backbone(x)
        out: Dict[str, Any] = {"backbone": features}
        rpn = model.proposal_generator
        logits, deltas = rpn.rpn_head([features[f] for f in rpn.in_features])
        out["rpn"] = {"objectness": logits, "anchor_deltas": deltas}
        h, w = image.shape[-2:]
        scores, deltas = box_predictions(model, features, Boxes(_fixed_boxes(int(h), int(w), x.dtype, x.device)))
        out["box_predictor"] = {"scores": scores, "deltas": deltas}
    return out


def box_predictions(model: nn.Module, features: Dict[str, torch.Tensor], boxes) -> Tuple[torch.Tensor, torch.Tensor]:
    """The box predictor's class scores and box deltas for the given proposals (``Boxes``) of one image."""
    heads = model.roi_heads
    if hasattr(heads, "_shared_roi_transform"):  # C4: res5 on each ROI
        box_features = heads._shared_roi_transform([features[f] for f in heads.in_features], [boxes])
        return heads.box_predictor(box_features.mean(dim=[2, 3]))
    box_features = heads.box_pooler([features[f] for f in heads.box_in_features], [boxes])  # FPN
    return heads.box_predictor(heads.box_head(box_features))
