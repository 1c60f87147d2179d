"""ONNX export of a (compressed) mmdet detector's raw outputs, checked in ONNX Runtime against PyTorch.

mmdetection 3.x exports whole detectors (pre-processing, box decoding, NMS) through mmdeploy, with
custom operators and its own runtime wrappers; a plain ``torch.onnx.export`` of ``model(x,
mode='predict')`` does not trace (data samples, Python-side post-processing). What is exported here
is the detector's network up to its raw outputs (:func:`~lrpet_dense.mmdet.model.raw_outputs`): the
preprocessed image (and, for a two-stage detector, a fixed number of proposals) in; the neck's
features, the RPN head's or dense head's per-level class scores and box deltas, and the ROI head's
class scores and box deltas out. mmdet's post-processing (``predict_by_feat``: decoding, NMS) stays
in PyTorch, as the staged export of :mod:`lrpet_dense.detectron2.onnx` keeps each stage checkable.

The file is written by torch's TorchScript exporter at opset 16 (the first whose ``RoiAlign`` has the
aligned mode of mmcv's ``RoIAlign``). mmdet 3.x's ROI extractor pools each FPN level only when it has
ROIs, a branch a trace would freeze; the exported graph pools every level and masks
(:func:`~lrpet_dense.mmdet.model.pooled_rois`), and the check's proposals span every level the
image allows plus a box smaller than a feature cell. The file is checked in ONNX Runtime: every
output must equal PyTorch's (mmdet's own forward) on the same inputs within float32 tolerance. As for the
other adapters, factorised ranks are zero-padded to multiples of ``align_ranks`` in the file (exact).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from lrpet_dense.openmmlab.pairing import unwrap_model

from .model import counted_proposals, fixed_rois, flat_tensors, padded_hw, raw_outputs

__all__ = ["export_onnx", "output_names"]


class _Exported(nn.Module):
    """``(image[, rois]) -> flat tuple of the raw outputs``: what is exported."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, rois: Optional[torch.Tensor] = None):
        # Exported: the ROI features without data-dependent branches; run eagerly (the reference the file
        # is checked against): mmdet's own ROI extractor.
        traceable = torch.onnx.is_in_onnx_export()
        return tuple(flat_tensors(raw_outputs(self.model, image, rois, traceable=traceable)))


def output_names(outputs: Dict[str, Any]) -> List[str]:
    """Names of the flattened raw outputs: ``features_0``, ``rpn_cls_0``, ``rpn_bbox_0``, ..., ``roi_cls``,
    ``roi_bbox``, ``dense_cls_0``, ``dense_bbox_0``, ..."""
    names: List[str] = [f"features_{i}" for i in range(len(outputs["features"]))]
    for key, short in (("rpn", "rpn"), ("dense_head", "dense")):
        if key in outputs:
            kinds = ["cls", "bbox"] + [f"out{j}" for j in range(2, len(outputs[key]))]
            for kind, per_level in zip(kinds, outputs[key]):
                names += [f"{short}_{kind}_{i}" for i in range(len(per_level))]
    if "roi" in outputs:
        names += ["roi_cls", "roi_bbox"][:len(outputs["roi"])]
    return names


def export_onnx(model: nn.Module, path: str, input_hw: Tuple[int, int], *, align_ranks: int = 16) -> Dict[str, Any]:
    """Export the detector's network up to its raw outputs to ONNX and check the file in ONNX Runtime.

    The image input is one preprocessed ``1 x 3 x H x W`` image (``input_hw`` padded to the data
    preprocessor's divisor); a two-stage detector also takes ``rois``: exactly
    :func:`~lrpet_dense.mmdet.model.counted_proposals` proposals ``(0, x1, y1, x2, y2)`` (the
    test-time proposal count). Every output of ONNX Runtime must equal PyTorch's on the same inputs
    within float32 tolerance; the factorised ranks are zero-padded to multiples of ``align_ranks``
    in the file (exact; 1 turns it off), checked against ``model``'s own outputs.

    Returns:
        ``{"inputs": [shapes], "outputs": count, "output_names": [...], "check": {...}, "aligned": [...]}``.

    Raises:
        ValueError: ONNX Runtime's outputs differ from PyTorch's.
    """
    from lrpet_dense.core.export import export_aligned

    model = unwrap_model(model).eval()
    param = next(model.parameters())
    h, w = padded_hw(model, input_hw)
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    args: Tuple[torch.Tensor, ...] = (image,)
    num_rois = counted_proposals(model)
    if num_rois:
        args += (fixed_rois(h, w, num_rois, dtype=param.dtype, device=param.device),)
    with torch.no_grad():
        names = output_names(raw_outputs(model, *args))
    out = export_aligned(model, _Exported, args, path, align_ranks=align_ranks, dynamo=False, opset=16,
                         input_names=["image", "rois"][:len(args)], output_names=names)
    return {"inputs": [list(a.shape) for a in args], "outputs": len(names), "output_names": names,
            "check": out["check"], "aligned": out["aligned"]}
