"""ONNX export of a (compressed) detectron2 detector, checked stage by stage in ONNX Runtime.

:func:`export_onnx` exports as detectron2's ``tools/deploy/export_model.py --export-method tracing``
does and checks the file before it is kept (see its docs).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.modeling import GeneralizedRCNN

from .model import box_predictions
from .pairing import unwrap_model

__all__ = ["export_onnx", "check_selection", "ROI_OPSET"]


#: the first ONNX opset whose RoiAlign has the half-pixel (``aligned=True``) mode detectron2 uses
ROI_OPSET = 16


def export_onnx(model: nn.Module, path: str, input_hw: Tuple[int, int], *, align_ranks: int = 16) -> Dict[str, Any]:
    """Export the detector to ONNX through detectron2's own path and check it in ONNX Runtime.

    As detectron2's ``tools/deploy/export_model.py --export-method tracing --format onnx``: a
    ``TracingAdapter`` around ``model.inference(..., do_postprocess=False)`` (input: one ``3 x H x W``
    image tensor, 0-255 in the model's format; outputs: the flattened ``Instances`` fields), exported
    with the TorchScript ONNX exporter. The opset is at least 16 (``ROI_OPSET``), not detectron2's
    ``STABLE_ONNX_OPSET_VERSION`` (11): below 16 torchvision exports ``RoIAlign(aligned=True)`` as the
    unaligned op (a warning only), and the exported detector's scores differ from PyTorch's (measured:
    by 0.24 on the toy model).

    The factorised ranks are zero-padded to multiples of ``align_ranks`` in the exported graph
    (:func:`lrpet_dense.core.export.export_aligned`: on a copy, exact; 1 turns it off).

    The check, on one random image, is staged so that float32 rounding does not fail a correct file: the
    detections at the end of a Faster R-CNN come through discrete steps (top-k, NMS), where ONNX
    Runtime's rounding, which is not PyTorch's, may legitimately break a near-tie another way (measured:
    1 random-weight toy detector in 6 gave another top box when only the detections were compared). So
    the graph is exported with its internal tensors as extra outputs and each stage is checked on the
    same inputs in both runtimes (:func:`_check_stages`): the RPN head's logits and deltas against
    ``model``'s (continuous, float32 tolerance); ONNX Runtime's proposals against the candidates of
    detectron2's proposal step run on ONNX Runtime's RPN outputs; the box predictor's scores and deltas
    for ONNX Runtime's proposals against ``model``'s (continuous); the detections against the
    candidates of detectron2's box inference run on ONNX Runtime's box predictions. A selection must
    be one detectron2's NMS and top-k could make from those candidates (:func:`check_selection`: exact
    ties, e.g. saturated scores of 1.0, make it ambiguous). The file written leaves the internal outputs
    out (same nodes) and must give the same detections, bit for bit.

    The file is written as :func:`lrpet_dense.core.export.export_onnx` writes (self-contained below 2 GB,
    checked in ONNX Runtime in a folder of its own before it is moved into place).

    Returns:
        ``{"inputs": [...], "outputs": number of outputs, "check": {...}, "aligned": [padded conv names],
        "files": the files written}``.

    Raises:
        ValueError: a stage differs in ONNX Runtime.
    """
    from detectron2.export import STABLE_ONNX_OPSET_VERSION

    from lrpet_dense.core.export import export_aligned

    model = unwrap_model(model).eval()
    _check_exportable(model)
    image = (torch.rand(3, *input_hw, generator=torch.Generator().manual_seed(0)) * 255).to(model.device)
    out = export_aligned(model, lambda m: _WithInternals(m, image), (image,), path, align_ranks=align_ranks,
                         dynamo=False, opset=max(STABLE_ONNX_OPSET_VERSION, ROI_OPSET),
                         compare=lambda module, outs, ref: _check_stages(model, image, module, outs, ref),
                         internal_outputs=_WithInternals.internal_outputs(model))
    return {"inputs": [list(image.shape)], "outputs": len(out["reference"]), "check": out["check"],
            "aligned": out["aligned"], "files": out["files"]}


def _check_exportable(model: nn.Module) -> None:
    """The export check covers Faster R-CNN (an RPN, a box head); refuse what it would leave unchecked."""
    from detectron2.modeling.proposal_generator import RPN

    heads = getattr(model, "roi_heads", None)
    if not isinstance(model, GeneralizedRCNN) or type(getattr(model, "proposal_generator", None)) is not RPN \
            or not hasattr(heads, "box_predictor"):
        raise ValueError(f"export_onnx checks Faster R-CNN detectors (GeneralizedRCNN, RPN, a box head); got "
                         f"{type(model).__name__} with {type(getattr(model, 'proposal_generator', None)).__name__} "
                         f"and {type(heads).__name__}")
    extra = [name for name in ("mask_on", "keypoint_on") if getattr(heads, name, False)]
    if extra:
        raise ValueError(f"export_onnx checks box detections only; this model's ROI heads have {extra}, whose "
                         "outputs the check would not cover")


def _inference(model, inputs):
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


class _WithInternals(nn.Module):
    """detectron2's ``TracingAdapter`` around ``model.inference(..., do_postprocess=False)``, its outputs
    followed by the tensors before and after each discrete step: the RPN head's objectness logits (one
    per level), its anchor deltas (one per level), the proposal boxes and their objectness logits, the
    box predictor's class scores and box deltas."""

    def __init__(self, model: nn.Module, image: torch.Tensor):
        from detectron2.export import TracingAdapter

        super().__init__()
        self.adapter = TracingAdapter(model, [{"image": image}], _inference)

    @staticmethod
    def internal_outputs(model: nn.Module) -> int:
        return 2 * len(model.proposal_generator.in_features) + 4

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        model, seen = self.adapter.model, {}
        rpn = model.proposal_generator

        def keep(name):
            return lambda module, inputs, output: seen.__setitem__(name, output)

        handles = [rpn.rpn_head.register_forward_hook(keep("rpn_head")), rpn.register_forward_hook(keep("rpn")),
                   model.roi_heads.box_predictor.register_forward_hook(keep("box_predictor"))]
        try:
            outs = self.adapter(image)
        finally:
            for h in handles:
                h.remove()
        (logits, deltas), (proposals, _), (scores, box_deltas) = seen["rpn_head"], seen["rpn"], seen["box_predictor"]
        return (*outs, *logits, *deltas, proposals[0].proposal_boxes.tensor, proposals[0].objectness_logits, scores,
                box_deltas)


def _check_stages(model: nn.Module, image: torch.Tensor, module: _WithInternals, outs: List[Any],
                  reference: List[torch.Tensor]) -> Dict[str, float]:
    """ONNX Runtime's outputs of :class:`_WithInternals` (``module``: the exported, possibly padded copy)
    checked stage by stage against ``model`` (``reference``: its PyTorch outputs), each stage on the same
    inputs in both runtimes (see :func:`export_onnx`). A selection (proposals, detections) must be one
    detectron2 could make from the same candidates (:func:`check_selection`)."""
    from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
    from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
    from detectron2.structures import Boxes, Instances

    from lrpet_dense.core.export import compare_onnx_outputs

    rpn, predictor = model.proposal_generator, model.roi_heads.box_predictor
    levels, n = len(rpn.in_features), len(outs) - _WithInternals.internal_outputs(model)
    outs = [torch.as_tensor(o).to(model.device) for o in outs]
    logits, deltas = outs[n:n + levels], outs[n + levels:n + 2 * levels]
    proposals, proposal_logits, scores, box_deltas = outs[n + 2 * levels:]
    result = {"rpn_head": max(compare_onnx_outputs(outs[n:n + 2 * levels], reference[n:n + 2 * levels],
                                                   "the RPN head").values())}
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        anchors = rpn.anchor_generator([features[f] for f in rpn.in_features])
        box_dim = rpn.anchor_generator.box_dim
        flat_logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        decoded = rpn._decode_proposals(anchors, [x.view(x.shape[0], -1, box_dim, *x.shape[-2:]).permute(0, 3, 4, 1, 2)
                                                  .flatten(1, -2) for x in deltas])
        candidates = []  # per level: its pre-NMS top-k, clipped, small boxes removed; no NMS (threshold 1)
        for level, (boxes_l, logits_l) in enumerate(zip(decoded, flat_logits)):
            c = find_top_rpn_proposals([boxes_l], [logits_l], images.image_sizes, 1.0, rpn.pre_nms_topk[False],
                                       len(logits_l[0]), rpn.min_box_size, False)[0]
            candidates.append((c.proposal_boxes.tensor, c.objectness_logits, torch.full_like(c.objectness_logits, level)))
        result["proposals_px"] = check_selection(
            (proposals, proposal_logits, None), tuple(torch.cat(t) for t in zip(*candidates)), "proposal",
            iou=rpn.nms_thresh, topk=rpn.post_nms_topk[False])
        result["box_predictor"] = max(compare_onnx_outputs(
            [scores, box_deltas], box_predictions(model, features, Boxes(proposals)),
            "the box predictor (on ONNX Runtime's proposals)").values())
        given = [Instances(images.image_sizes[0], proposal_boxes=Boxes(proposals))]
        predictions = (scores, box_deltas)
        tol = _score_tol(1.0)
        c = fast_rcnn_inference_single_image(predictor.predict_boxes(predictions, given)[0],
                                             predictor.predict_probs(predictions, given)[0], images.image_sizes[0],
                                             predictor.test_score_thresh - tol, 1.0, -1)[0]
    found = module.adapter.outputs_schema(outs[:n])[0]["instances"]
    result["detections_px"] = check_selection(
        (found.pred_boxes.tensor, found.scores, found.pred_classes),
        (c.pred_boxes.tensor, c.scores, c.pred_classes), "detection", iou=predictor.test_nms_thresh,
        topk=predictor.test_topk_per_image, floor=predictor.test_score_thresh)
    return result


def _score_tol(largest: float) -> float:
    return 1e-4 * (1.0 + abs(largest))


def check_selection(found: Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
                     candidates: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], what: str, *, iou: float, topk: int,
                     floor: Optional[float] = None, iou_eps: float = 1e-3) -> float:
    """ONNX Runtime's selection is one that detectron2's greedy NMS (per group, suppressing IoU > ``iou``),
    then the ``topk`` best scores, makes from ``candidates`` for some order of (near-)tied scores.

    ``found`` and ``candidates`` are ``(boxes, scores, groups)`` (groups: classes or RPN levels; the
    found ones' groups may be None and are then the matched candidates'). Each found box must be a
    distinct candidate (score within a float32 tolerance, box within 0.01 px + 1e-3 of the largest
    coordinate, same group); no two found boxes of a group may overlap by more than ``iou``; and every
    candidate not found must have been suppressed by a found one of its group with a score as high,
    cut by ``topk``, or be at the score ``floor``. Ties make the selection itself ambiguous (a random
    detector's saturated class scores are exactly 1.0 for several overlapping boxes), so it is not
    compared with detectron2's own.

    Returns:
        The largest distance (px) between a found box and its candidate.
    """
    from detectron2.structures import Boxes, pairwise_iou

    boxes, scores, groups = found
    c_boxes, c_scores, c_groups = candidates
    s_tol = _score_tol(float(c_scores.abs().max()) if len(c_scores) else 0.0)
    if not len(boxes):
        if len(c_boxes) and (floor is None or bool((c_scores > floor + s_tol).any())):
            raise ValueError(f"ONNX Runtime selects no {what} boxes from {len(c_boxes)} candidates")
        return 0.0
    box_tol = 1e-2 + 1e-3 * (float(c_boxes.abs().max()) if len(c_boxes) else 0.0)
    distance = (boxes[:, None, :] - c_boxes[None, :, :]).abs().amax(dim=2)  # found x candidates
    eligible = (distance <= box_tol) & ((scores[:, None] - c_scores[None, :]).abs() <= s_tol)
    if groups is not None:
        eligible &= groups[:, None] == c_groups[None, :]
    match, taken = [], set()
    for i in range(len(boxes)):
        options = [int(j) for j in eligible[i].nonzero().flatten() if int(j) not in taken]
        if not options:
            raise ValueError(f"ONNX Runtime's {what} {i} (score {float(scores[i]):.4g}) is not among detectron2's "
                             f"candidates from the same inputs (nearest box {float(distance[i].min()):.3g} px away)")
        j = min(options, key=lambda k: float(distance[i, k]))
        match.append(j)
        taken.add(j)
    match_t = torch.tensor(match, device=c_boxes.device)
    k_boxes, k_scores, k_groups = c_boxes[match_t], c_scores[match_t], c_groups[match_t]
    overlap = pairwise_iou(Boxes(k_boxes), Boxes(k_boxes))
    same = (k_groups[:, None] == k_groups[None, :]) & ~torch.eye(len(match), dtype=torch.bool, device=c_boxes.device)
    if bool((same & (overlap > iou + iou_eps)).any()):
        a, b = [int(v) for v in (same & (overlap > iou + iou_eps)).nonzero()[0]]
        raise ValueError(f"ONNX Runtime keeps {what}s {a} and {b} of one group overlapping by IoU "
                         f"{float(overlap[a, b]):.3f} > {iou}")
    rest = torch.tensor([j for j in range(len(c_boxes)) if j not in taken], dtype=torch.long, device=c_boxes.device)
    if len(rest):
        r_iou = pairwise_iou(Boxes(c_boxes[rest]), Boxes(k_boxes))  # rest x kept
        suppressed = ((r_iou > iou - iou_eps) & (c_groups[rest][:, None] == k_groups[None, :])
                      & (k_scores[None, :] >= c_scores[rest][:, None] - s_tol)).any(dim=1)
        cut = (c_scores[rest] <= k_scores.min() + s_tol) if len(match) == topk else torch.zeros_like(suppressed)
        low = (c_scores[rest] <= floor + s_tol) if floor is not None else torch.zeros_like(suppressed)
        missing = ~(suppressed | cut | low)
        if bool(missing.any()):
            j = int(rest[missing.nonzero()[0, 0]])
            raise ValueError(f"ONNX Runtime drops detectron2's {what} candidate {j} (score {float(c_scores[j]):.4g}), "
                             f"which no kept {what} suppresses and no top-{topk} cut removes")
    return float(distance[torch.arange(len(match)), match_t].max())
