"""Compressed (factorised) detectron2 checkpoints: write them, check them, load them through detectron2's paths.

A compressed checkpoint is a ``.pth`` file loadable with ``torch.load(weights_only=True)``::

    {"model": state dict of the factorised model (+ "_lrpet_plan": the plan as UTF-8 JSON bytes, uint8),
     "lrpet_plan": RankPlan.to_dict() (plain data), "lrpet_factorized": [names of factorised convs], "meta": {...}}

Loading does not depend on the model type: :func:`~lrpet_dense.core.enable_compressed_loading_`
registers a ``load_state_dict`` pre-hook that reads the plan carried in the state dict and installs
the factorised convs before the weights are copied. ``tools/train_det.py`` (training and
``--eval-only``), ``tools/compress_det.py`` and ``tools/report.py`` enable it on every model they
build, so a compressed checkpoint loads whatever ``MODEL.META_ARCHITECTURE`` says; the LRPET configs
also set ``LRPETGeneralizedRCNN``, a ``GeneralizedRCNN`` registered in ``META_ARCH_REGISTRY`` with the
hook on, so that detectron2's own ``DefaultPredictor`` loads them too. (A stock ``GeneralizedRCNN``
built outside this project's code cannot know about factorised layers: detectron2 only warns about
unexpected keys there.) A plan that does not fit the model, a factorised state dict without a plan,
or a dense checkpoint loaded into an already factorised model is a ``ValueError`` naming the problem.

:func:`compress_model_` checks what it produces: every planned conv must already be of its planned
rank, and the factorised model's pre-NMS outputs (:func:`output_tensors`: backbone features, RPN
logits and box deltas, box-head scores and deltas for fixed proposals) must equal the dense model's
in float64 (:func:`~lrpet_dense.core.compare_outputs`); otherwise nothing is changed.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from lrpet_dense.core import FactorizedConv2d, LRPETConfig, RankPlan, enable_compressed_loading_
from lrpet_dense.core.factorize import (PLAN_STATE_KEY, check_trainable_, compressed_state_dict, model_plan,
                                        plan_from_tensor)
from lrpet_dense.core.selection import eval_mode
from lrpet_dense.core.verify import factorize_checked_
from lrpet_dense.io import atomic_save, check_finite_state, load_checkpoint_safe, plain_data

from .pairing import pair_convs, unwrap_model

__all__ = [
    "LRPETGeneralizedRCNN", "CompressedAwareCheckpointer", "load_model", "plan_from_checkpoint", "compressed_plan_of",
    "compress_model_", "save_compressed", "count_complexity", "output_tensors", "to_inference_", "export_onnx",
]

logger = logging.getLogger(__name__)


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


def plan_from_checkpoint(checkpoint: Dict[str, Any]) -> Optional[RankPlan]:
    """The rank plan stored in a checkpoint dict, or None.

    Looks at a compressed checkpoint's ``lrpet_plan`` (and its state dict's ``_lrpet_plan``) and at a
    training checkpoint's LRPET hook state (``checkpoint["trainer"]["hooks"]["LRPETHook"]["plan"]``).
    """
    if checkpoint.get("lrpet_plan") is not None:
        return RankPlan.from_dict(checkpoint["lrpet_plan"])
    state = checkpoint.get("model")
    if isinstance(state, dict) and PLAN_STATE_KEY in state:
        return plan_from_tensor(state[PLAN_STATE_KEY])
    hook_state = (checkpoint.get("trainer") or {}).get("hooks", {}).get("LRPETHook")
    if hook_state and hook_state.get("plan") is not None:
        return RankPlan.from_dict(hook_state["plan"])
    return None


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


def output_tensors(model: nn.Module, image: torch.Tensor) -> Dict[str, Any]:
    """The detector's tensors before any discrete step (NMS, top-k, thresholds), for one image.

    Backbone features; RPN objectness logits and anchor deltas; box-head class scores and box deltas
    for a fixed set of proposals (so both models see the same ROIs). Run it on two models (e.g. in
    float64) and compare with :func:`~lrpet_dense.core.compare_outputs`.

    Args:
        model: a ``GeneralizedRCNN`` (C4 ``Res5ROIHeads`` or FPN ``StandardROIHeads``), in eval mode.
        image: ``3 x H x W`` image tensor in the model's input format (0-255), any float dtype.
    """
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
        scores, deltas = _box_predictions(model, features, Boxes(_fixed_boxes(int(h), int(w), x.dtype, x.device)))
        out["box_predictor"] = {"scores": scores, "deltas": deltas}
    return out


def _box_predictions(model: nn.Module, features: Dict[str, torch.Tensor], boxes) -> Tuple[torch.Tensor, torch.Tensor]:
    """The box predictor's class scores and box deltas for the given proposals (``Boxes``) of one image."""
    heads = model.roi_heads
    if hasattr(heads, "_shared_roi_transform"):  # C4: res5 on each ROI
        box_features = heads._shared_roi_transform([features[f] for f in heads.in_features], [boxes])
        return heads.box_predictor(box_features.mean(dim=[2, 3]))
    box_features = heads.box_pooler([features[f] for f in heads.box_in_features], [boxes])  # FPN
    return heads.box_predictor(heads.box_head(box_features))


def compress_model_(model: nn.Module, plan: RankPlan, *, project: bool = False, config: Optional[LRPETConfig] = None,
                    check_hw: Tuple[int, int] = (160, 160), rtol: float = 1e-4) -> List[str]:
    """Factorise the planned convs of a trained, projected detector in place, once checked.

    The steps, errors and the meaning of ``project`` (one-shot truncation first, with ``config``'s
    projection options; default: refuse weights that are not low-rank), ``config`` and ``rtol`` are
    :func:`lrpet_dense.core.verify.factorize_checked_`'s; the outputs compared in float64 are the
    pre-NMS tensors of :func:`output_tensors` on one random ``check_hw`` image (default 160x160).
    Returns the names of the factorised convs.
    """
    model = unwrap_model(model)
    layers = pair_convs(model, LRPETConfig(include=tuple(plan.layers), include_frozen=True)).layers if project else None
    image = torch.rand(3, *check_hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    return factorize_checked_(model, plan, lambda m: output_tensors(m, image), project_layers=layers, config=config,
                              rtol=rtol, what="the factorised detector")


def save_compressed(model: nn.Module, path: str, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write a factorised ``model`` as a compressed checkpoint, atomically (plain data and tensors only).

    ``{"model": state dict (+ "_lrpet_plan"), "lrpet_plan": the plan, "lrpet_factorized": [names],
    "meta": meta}``.

    Returns:
        The saved checkpoint dict.
    """
    model = unwrap_model(model)
    plan = model_plan(model)
    if plan is None:
        raise ValueError("the model is not factorised: call compress_model_ first")
    factorized = sorted(n for n, m in model.named_modules() if isinstance(m, FactorizedConv2d))
    ckpt = {"model": compressed_state_dict(model), "lrpet_plan": plan.to_dict(), "lrpet_factorized": factorized,
            "meta": plain_data(dict(meta or {}))}
    atomic_save(ckpt, path)
    logger.info("wrote compressed checkpoint %s", path)
    return ckpt


def count_complexity(model: nn.Module, image_hw: Tuple[int, int]) -> Dict[str, Dict[str, int]]:
    """Params and MACs of the backbone and the whole model, by detectron2's ``FlopCountAnalysis``.

    Counts one inference of a ``3 x H x W`` image, as detectron2's ``tools/analyze_model.py`` does
    (fvcore counts one "flop" per multiply-accumulate).

    Returns:
        ``{"backbone": {"params", "macs"}, "model": {"params", "macs"}}``.
    """
    from detectron2.utils.analysis import FlopCountAnalysis
    from fvcore.nn import parameter_count

    model = unwrap_model(model)
    h, w = image_hw
    image = (torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255).to(model.device)
    with eval_mode(model):
        flops = FlopCountAnalysis(model, [{"image": image, "height": h, "width": w}])
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_module = flops.by_module()  # keys are prefixed by the TracingAdapter's "model."
    params = parameter_count(model)
    return {"backbone": {"params": int(params.get("backbone", 0)), "macs": int(by_module["model.backbone"])},
            "model": {"params": int(params[""]), "macs": int(flops.total())}}


def load_model(cfg, path: str, *, dense_only: bool = False) -> nn.Module:
    """Build ``cfg``'s model (any meta architecture) and load a dense or compressed ``.pth`` checkpoint strictly.

    The checkpoint is read with ``torch.load(weights_only=True)`` (errors name the file); a compressed
    one first builds its factorised convs (:func:`~lrpet_dense.core.enable_compressed_loading_`); any
    missing, unexpected or mis-shaped key is an error (detectron2's own checkpointer only warns).

    Args:
        cfg: a detectron2 config (``MODEL.WEIGHTS`` is ignored).
        path: the checkpoint.
        dense_only: refuse a compressed checkpoint (for tools that need dense weights). Defaults to False.

    Returns:
        ``(model, checkpoint)``: the model in eval mode and the whole checkpoint dict.
    """
    from detectron2.modeling import build_model

    ckpt = load_checkpoint_safe(path)
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds no model state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if dense_only and (ckpt.get("lrpet_factorized") is not None or PLAN_STATE_KEY in state):
        raise ValueError(f"checkpoint {path!r} is already compressed (factorised); give the dense training "
                         "checkpoint it was made from (e.g. model_final.pth)")
    check_finite_state(state, f"checkpoint {path!r}")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    model = enable_compressed_loading_(build_model(cfg))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing / unexpected keys, size mismatches
        raise ValueError(f"checkpoint {path!r} does not match the config's model: {e}") from e
    return model.eval(), ckpt


class CompressedAwareCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` that loads compressed checkpoints into any detector strictly.

    Enables :func:`~lrpet_dense.core.enable_compressed_loading_` on the model, and when what was
    loaded is compressed (the model is now factorised), any missing or unexpected key is an error
    instead of detectron2's warning: a partly loaded factorised model would evaluate silently wrong.
    Dense checkpoints (``.pth``, model-zoo ``.pkl``) load exactly as with ``DetectionCheckpointer``.
    """

    def __init__(self, model: nn.Module, save_dir: str = "", **kwargs):
        enable_compressed_loading_(unwrap_model(model))
        super().__init__(model, save_dir, **kwargs)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if model_plan(unwrap_model(self.model)) is not None:
            problems = list(incompatible.missing_keys) + list(incompatible.unexpected_keys)
            problems += [k for k, *_ in incompatible.incorrect_shapes]
            if problems:
                raise ValueError(f"the compressed checkpoint did not load completely into the factorised model: "
                                 f"{len(problems)} missing, unexpected or mis-shaped keys, e.g. {problems[:4]}")
        return incompatible


def compressed_plan_of(weights: str) -> Optional[RankPlan]:
    """The plan of a local compressed checkpoint file (``MODEL.WEIGHTS``), or None for anything else."""
    if not weights or "://" in weights or not weights.endswith((".pth", ".pt")) or not os.path.isfile(weights):
        return None
    ckpt = load_checkpoint_safe(weights)
    state = ckpt.get("model") if isinstance(ckpt.get("model"), dict) else None
    if ckpt.get("lrpet_factorized") is None and not (state is not None and PLAN_STATE_KEY in state):
        return None
    return plan_from_checkpoint(ckpt)



def to_inference_(model: nn.Module, *, check_hw: Tuple[int, int] = (160, 160), rtol: float = 1e-4) -> nn.Module:
    """The deploy path's inference form, in place: every BatchNorm after a conv (dense or factorised)
    folded into it and ``channels_last`` weights on CPU (:mod:`lrpet_dense.core.deploy`).

    The folding is checked first on a copy: the pre-NMS outputs (:func:`output_tensors`) must equal
    the model's as it was, in float64; otherwise nothing changes. Inference only (training the folded
    model is an error).

    Returns:
        ``model`` (unwrapped), in eval mode.
    """
    from detectron2.layers import Conv2d as D2Conv2d

    from lrpet_dense.core.deploy import EVERY_CONV, to_inference_checked_

    model = unwrap_model(model).eval()
    image = torch.rand(3, *check_hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    return to_inference_checked_(model, lambda m: pair_convs(m, EVERY_CONV, factorized=True).layers,
                                 lambda m: output_tensors(m, image), conv_types=(D2Conv2d,), rtol=rtol,
                                 what="the detector with its BatchNorms folded")


#: the first ONNX opset whose RoiAlign has the half-pixel (``aligned=True``) mode detectron2 uses
ROI_OPSET = 16


def export_onnx(model: nn.Module, path: str, image_hw: Tuple[int, int], *, align_ranks: int = 16) -> Dict[str, Any]:
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
    be one detectron2's NMS and top-k could make from those candidates (:func:`_check_selection`: exact
    ties, e.g. saturated scores of 1.0, make it ambiguous). The file written leaves the internal outputs
    out (same nodes) and must give the same detections, bit for bit.

    Returns:
        ``{"inputs": [...], "outputs": number of outputs, "check": {...}, "aligned": [padded conv names]}``.

    Raises:
        ValueError: a stage differs in ONNX Runtime.
    """
    from detectron2.export import STABLE_ONNX_OPSET_VERSION

    from lrpet_dense.core.export import export_aligned

    model = unwrap_model(model).eval()
    _check_exportable(model)
    image = (torch.rand(3, *image_hw, generator=torch.Generator().manual_seed(0)) * 255).to(model.device)
    out = export_aligned(model, lambda m: _WithInternals(m, image), (image,), path, align_ranks=align_ranks,
                         dynamo=False, opset=max(STABLE_ONNX_OPSET_VERSION, ROI_OPSET),
                         compare=lambda module, outs, ref: _check_stages(model, image, module, outs, ref),
                         internal_outputs=_WithInternals.internal_outputs(model))
    return {"inputs": [list(image.shape)], "outputs": len(out["reference"]), "check": out["check"],
            "aligned": out["aligned"]}


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
    detectron2 could make from the same candidates (:func:`_check_selection`)."""
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
        result["proposals_px"] = _check_selection(
            (proposals, proposal_logits, None), tuple(torch.cat(t) for t in zip(*candidates)), "proposal",
            iou=rpn.nms_thresh, topk=rpn.post_nms_topk[False])
        result["box_predictor"] = max(compare_onnx_outputs(
            [scores, box_deltas], _box_predictions(model, features, Boxes(proposals)),
            "the box predictor (on ONNX Runtime's proposals)").values())
        given = [Instances(images.image_sizes[0], proposal_boxes=Boxes(proposals))]
        predictions = (scores, box_deltas)
        tol = _score_tol(1.0)
        c = fast_rcnn_inference_single_image(predictor.predict_boxes(predictions, given)[0],
                                             predictor.predict_probs(predictions, given)[0], images.image_sizes[0],
                                             predictor.test_score_thresh - tol, 1.0, -1)[0]
    found = module.adapter.outputs_schema(outs[:n])[0]["instances"]
    result["detections_px"] = _check_selection(
        (found.pred_boxes.tensor, found.scores, found.pred_classes),
        (c.pred_boxes.tensor, c.scores, c.pred_classes), "detection", iou=predictor.test_nms_thresh,
        topk=predictor.test_topk_per_image, floor=predictor.test_score_thresh)
    return result


def _score_tol(largest: float) -> float:
    return 1e-4 * (1.0 + abs(largest))


def _check_selection(found: Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
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
