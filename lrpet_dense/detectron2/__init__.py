"""LRPET for detectron2: config keys, conv/BN pairing, the training hook and trainer, compressed checkpoints.

The same parts, under the same names, as :mod:`lrpet_dense.mmseg`, on one contract
(:class:`lrpet_dense.core.adapter.Adapter`; this framework's is :data:`ADAPTER`):

- ``config``: :func:`add_lrpet_config` adds ``cfg.LRPET``; :func:`lrpet_config` maps it onto
  :class:`~lrpet_dense.core.LRPETConfig` (each key is the field of the same name);
- ``pairing``: :func:`pair_convs` -> :class:`~lrpet_dense.core.Pairing` (``conv.norm``);
- ``hook``: :class:`LRPETHook` (from a model and an ``LRPETConfig``, or ``LRPETHook.from_config(cfg,
  model)``; place it with :func:`insert_before_checkpointer`), :func:`build_plan`, :func:`default_plan_hw`;
- ``training``: :class:`LRPETTrainer` (``DefaultTrainer`` with LRPET and its guards) and, for LazyConfig
  or your own trainer, :func:`prepare_model_`, :func:`train_loader_seed`, :func:`rng_preserving`;
- ``model``: the ``LRPETGeneralizedRCNN`` meta architecture (registered on import), :func:`output_tensors`;
- ``deploy``: :func:`load_model`, :func:`compress_model_`, :func:`save_compressed`,
  :func:`plan_from_checkpoint`, :func:`count_complexity`, :func:`to_inference_`,
  :class:`CompressedAwareCheckpointer`; ``onnx``: :func:`export_onnx`;
- ``report``: :func:`measure`; ``search``: ``DetTrialRunner``; ``checkpoint``: :class:`RNGStateHook`,
  for exact ``--resume``.

The command line is ``lrpet-dense train-det | compress det | report det | export det | search det``.
"""
from .adapter import ADAPTER, Detectron2Adapter, default_plan_hw
from .checkpoint import RNGStateHook
from .config import add_lrpet_config, lrpet_config, lrpet_enabled, register_toy_voc, register_toy_voc_from_env
from .deploy import (CompressedAwareCheckpointer, compress_model_, count_complexity, export_onnx, load_model,
                     plan_from_checkpoint, save_compressed, to_inference_)
from .hook import LRPETHook, build_plan, insert_before_checkpointer
from .model import LRPETGeneralizedRCNN, output_tensors
from .pairing import default_include, pair_convs, unwrap_model
from .training import LRPETTrainer, prepare_model_, rng_preserving, train_loader_seed

__all__ = [
    "add_lrpet_config", "lrpet_config", "lrpet_enabled", "pair_convs", "default_include", "unwrap_model", "build_plan",
    "default_plan_hw", "LRPETHook", "insert_before_checkpointer", "RNGStateHook", "LRPETTrainer", "prepare_model_",
    "train_loader_seed", "rng_preserving", "LRPETGeneralizedRCNN", "CompressedAwareCheckpointer", "load_model",
    "plan_from_checkpoint", "compress_model_", "save_compressed", "count_complexity", "output_tensors",
    "to_inference_", "export_onnx", "register_toy_voc", "register_toy_voc_from_env", "ADAPTER", "Detectron2Adapter",
]
