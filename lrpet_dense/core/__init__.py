"""The framework-free LRPET core: torch only.

The public API (everything else in the submodules is internal to lrpet_dense):

- :class:`LRPETConfig`: every option, validated once;
- the plan: :func:`build_rank_plan` -> :class:`RankPlan` (of :class:`LayerPlan`, from :class:`LayerSpec`),
  :func:`rank_from_ratio`;
- one weight: :func:`lrpet_project`; one model's layers (:class:`ConvBN` triples, e.g. a framework
  adapter's :class:`Pairing`), in place and atomic, shared over ranks in a distributed job:
  :func:`project_` -> :class:`LayerStats`; the training schedule: :class:`LRPETProjector`;
- after the final projection: :func:`recalibrate_bn_` (BN statistics for the final weights);
- inference: :func:`factorize_` (:class:`FactorizedConv2d`), :func:`enable_compressed_loading_`,
  and the float64 output check :func:`compare_outputs`;
- a training run: :class:`LRPETSession` (when to project, the final projection, resume state), which
  every training loop and framework hook drives;
- the adapter contract :class:`Adapter` (:mod:`lrpet_dense.core.adapter`): what a framework supplies,
  and compression, the inference form, checkpoints and planning written once against it;
- any ``nn.Module`` in a plain PyTorch loop (:mod:`lrpet_dense.core.plain`): :func:`prepare` ->
  :class:`LRPETSession`, :func:`pair_convs`, :func:`build_plan`, :func:`compress_model_`,
  :func:`to_inference_`, :func:`save_compressed`, :func:`load_compressed_`, :func:`plan_from_checkpoint`,
  :func:`export_onnx`.

Example:
    >>> import torch
    >>> from lrpet_dense.core import LRPETConfig, lrpet_project
    >>> w = lrpet_project(torch.randn(64, 32, 3, 3), 16, config=LRPETConfig(energy_transfer=False))
    >>> torch.linalg.matrix_rank(w.reshape(64, -1)).item()
    16
"""
from .bn import recalibrate_bn_
from .config import LRPETConfig
from .distributed import DistributedProjectionError, project_
from .factorize import FactorizedConv2d, enable_compressed_loading_, factorize_
from .projection import ConvBN, LayerStats, lrpet_project
from .rank import LayerPlan, LayerSpec, RankPlan, build_rank_plan, rank_from_ratio
from .schedule import LRPETProjector, ProjectionError, ProjectionSummary
from .selection import Pairing
from .session import LRPETSession
from .adapter import Adapter
from .plain import (build_plan, compress_model_, export_onnx, load_compressed_, pair_convs, plan_from_checkpoint,
                    prepare, save_compressed, to_inference_)
from .verify import OutputMismatchError, compare_outputs

__all__ = [
    "LRPETConfig",
    "RankPlan", "LayerPlan", "LayerSpec", "build_rank_plan", "rank_from_ratio",
    "ConvBN", "LayerStats", "lrpet_project", "project_", "Pairing",
    "LRPETProjector", "ProjectionSummary", "ProjectionError", "DistributedProjectionError", "LRPETSession",
    "recalibrate_bn_",
    "FactorizedConv2d", "factorize_", "enable_compressed_loading_",
    "compare_outputs", "OutputMismatchError", "Adapter",
    # any nn.Module in a plain PyTorch loop (lrpet_dense.core.plain)
    "prepare", "pair_convs", "build_plan", "compress_model_", "to_inference_", "save_compressed", "load_compressed_",
    "plan_from_checkpoint", "export_onnx",
]
