"""LRPET for detectron2: config keys, conv/BN pairing, the training hook and compressed checkpoints.

The same parts, under the same names, as :mod:`lrpet_dense.mmseg`:

- ``config``: :func:`add_lrpet_config` adds ``cfg.LRPET``; :func:`lrpet_config` maps it onto
  :class:`~lrpet_dense.core.LRPETConfig` (each key is the field of the same name);
- ``pairing``: :func:`pair_convs` -> :class:`~lrpet_dense.core.Pairing` (``conv.norm``);
- ``hook``: :class:`LRPETHook` (place it with :func:`insert_before_checkpointer`), :func:`build_plan`;
- ``deploy``: :func:`load_model`, :func:`compress_model_`, :func:`save_compressed`,
  :func:`plan_from_checkpoint`, :func:`count_complexity`, :func:`output_tensors`, the
  ``LRPETGeneralizedRCNN`` meta architecture (registered on import) and
  :class:`CompressedAwareCheckpointer`;
- ``report``: :func:`measure`; ``checkpoint``: :class:`RNGStateHook`, for exact ``--resume``.

The command line is ``lrpet-dense train-det | compress det | report det`` (``tools/train_det.py``).
"""
from .checkpoint import RNGStateHook
from .config import add_lrpet_config, lrpet_config, register_toy_voc, register_toy_voc_from_env
from .deploy import (CompressedAwareCheckpointer, LRPETGeneralizedRCNN, compress_model_, count_complexity,
                     export_onnx, load_model, output_tensors, plan_from_checkpoint, save_compressed,
                     to_inference_)
from .hook import LRPETHook, build_plan, insert_before_checkpointer
from .pairing import default_include, pair_convs, unwrap_model

__all__ = [
    "add_lrpet_config", "lrpet_config", "pair_convs", "default_include", "unwrap_model", "build_plan", "LRPETHook",
    "insert_before_checkpointer", "RNGStateHook", "LRPETGeneralizedRCNN", "CompressedAwareCheckpointer", "load_model",
    "plan_from_checkpoint", "compress_model_", "save_compressed", "count_complexity", "output_tensors",
    "to_inference_", "export_onnx", "register_toy_voc", "register_toy_voc_from_env",
]
