"""The framework-free LRPET core: torch only.

Public API:
    rank rule and plan: :func:`rank_from_ratio`, :class:`LayerSpec`, :func:`build_rank_plan`, :class:`RankPlan`;
    projection: :func:`lrpet_project`, :func:`project_layers_`, :class:`ConvBN`, :class:`LayerStats`;
    factorisation: :class:`FactorizedConv2d`, :func:`factorize_`, :func:`build_factorized_`;
    MACs: :func:`conv_macs`, :func:`factorized_macs`, :func:`factorization_saves`;
    output sizes for planning: :func:`record_output_sizes`.
"""
from .factorize import (PLAN_METADATA_KEY, PLAN_STATE_KEY, FactorizedConv2d, build_factorized_, check_trainable_,
                        compressed_state_dict,
                        enable_compressed_loading_, factorize_, model_plan, plan_in_state_dict)
from .macs import conv_macs, factorization_saves, factorized_macs
from .projection import (ConvBN, LayerStats, bn_scale_of, compute_layer_projections, compute_projection, lrpet_project,
                         project_layers_)
from .distributed import DistributedProjectionError, project_layers_distributed_
from .schedule import LRPETProjector, ProjectionError, ProjectionSummary
from .rank import (LayerPlan, LayerSpec, RankPlan, build_rank_plan, explicit_names, match_any, rank_from_ratio,
                   select_names)
from .verify import OutputMismatchError, compare_outputs, float64_copy, rank_excess, run_float64
from .shapes import layer_specs, record_output_sizes

__all__ = [
    "rank_from_ratio", "LayerSpec", "LayerPlan", "RankPlan", "build_rank_plan", "match_any", "select_names",
    "ConvBN", "LayerStats", "lrpet_project", "compute_projection", "compute_layer_projections", "project_layers_",
    "bn_scale_of",
    "FactorizedConv2d", "factorize_", "build_factorized_", "enable_compressed_loading_", "check_trainable_", "compressed_state_dict",
    "plan_in_state_dict", "model_plan", "PLAN_STATE_KEY", "PLAN_METADATA_KEY", "explicit_names",
    "rank_excess", "compare_outputs", "float64_copy", "run_float64", "OutputMismatchError",
    "conv_macs", "factorized_macs", "factorization_saves",
    "record_output_sizes", "layer_specs", "LRPETProjector", "ProjectionSummary", "ProjectionError",
    "project_layers_distributed_", "DistributedProjectionError",
]
