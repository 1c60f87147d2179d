"""LRPET for detectron2: config keys, conv/BN pairing, the training hook and compressed checkpoints.

Importing this package registers ``LRPETGeneralizedRCNN`` in detectron2's ``META_ARCH_REGISTRY``.

- :func:`add_lrpet_config` adds the ``cfg.LRPET`` subtree;
- :func:`pair_convs` turns a model into the core's ``(name, conv, bn)`` triples (``conv.norm``);
- :class:`LRPETHook` projects during training (place it with :func:`insert_before_checkpointer`);
- :class:`RNGStateHook` checkpoints the RNG states, so that ``--resume`` replays a run exactly;
- :func:`compress_model_` / :func:`save_compressed` write a compressed checkpoint, which
  ``LRPETGeneralizedRCNN`` (so ``DefaultPredictor`` and ``--eval-only``) loads.

See ``tools/train_det.py`` and ``tools/compress_det.py``.
"""
from .config import add_lrpet_config, register_toy_voc, register_toy_voc_from_env
from .deploy import (PLAN_STATE_KEY, LRPETGeneralizedRCNN, check_low_rank, compress_model_, compressed_checkpoint,
                     count_flops_params, enable_compressed_loading_, plan_from_checkpoint, save_compressed)
from .hook import LRPETHook, build_lrpet_plan, insert_before_checkpointer, pairing_from_cfg
from .pairing import Pairing, candidate_convs, default_include, pair_convs, unwrap_model
from .rng import RNGStateHook

__all__ = [
    "add_lrpet_config", "register_toy_voc", "register_toy_voc_from_env",
    "Pairing", "pair_convs", "default_include", "candidate_convs", "unwrap_model",
    "LRPETHook", "build_lrpet_plan", "pairing_from_cfg", "insert_before_checkpointer", "RNGStateHook",
    "LRPETGeneralizedRCNN", "enable_compressed_loading_", "PLAN_STATE_KEY", "plan_from_checkpoint",
    "check_low_rank", "compress_model_", "compressed_checkpoint", "save_compressed", "count_flops_params",
]
