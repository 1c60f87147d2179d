"""ONNX export of a (compressed) mmseg segmentor in ``mode='tensor'`` (image -> logits), checked in ONNX Runtime."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn

from .pairing import unwrap_model

__all__ = ["export_onnx"]


class _TensorMode(nn.Module):
    """``model(x, mode='tensor')`` as a one-input module (what is exported)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, mode="tensor")


def export_onnx(model: nn.Module, path: str, input_hw: Tuple[int, int], *, align_ranks: int = 16) -> Dict[str, Any]:
    """Export the segmentor in ``mode='tensor'`` (image -> logits) to ONNX and check it in ONNX Runtime.

    Uses ``torch.onnx.export``'s dynamo exporter (the TorchScript one cannot export PSPNet's adaptive
    pooling to non-divisible sizes). ONNX Runtime's logits must equal PyTorch's on the same input
    within float32 tolerance. As the detectron2 adapter's, the factorised ranks are zero-padded to
    multiples of ``align_ranks`` in the exported graph (on a copy, exact; 1 turns it off), and ONNX
    Runtime's logits are checked against ``model``'s own.

    The dynamo exporter keeps the weights in a separate file; the file written holds them (one file up
    to protobuf's 2 GB, else ``NAME.onnx.data`` beside it: :func:`lrpet_dense.core.export.export_onnx`).

    Returns:
        ``{"inputs": [...], "outputs": 1, "check": {...}, "aligned": [padded conv names], "files": the files
        written}``.

    Raises:
        ValueError: ONNX Runtime's logits differ from PyTorch's.
    """
    from lrpet_dense.core.export import export_aligned

    model = unwrap_model(model).eval()
    param = next(model.parameters())
    x = torch.randn(1, 3, *input_hw, generator=torch.Generator().manual_seed(0)).to(param.device)
    out = export_aligned(model, _TensorMode, (x,), path, align_ranks=align_ranks, dynamo=True, opset=18,
                         input_names=["image"], output_names=["logits"])
    return {"inputs": [list(x.shape)], "outputs": 1, "check": out["check"], "aligned": out["aligned"],
            "files": out["files"]}
