"""LRPET for mmsegmentation: the ``LRPETHook``, conv-BN pairing, and factorised deployment.

Importing this package registers :class:`LRPETHook` in mmengine's ``HOOKS`` registry and
:class:`LRPETEncoderDecoder` in mmseg's ``MODELS`` registry, so a config only needs::

    custom_imports = dict(imports=['lrpet_dense.mmseg'], allow_failed_imports=False)
    custom_hooks = [dict(type='LRPETHook', target_macs_cut=0.3, interval=500)]
"""
from .deploy import (PLAN_KEY, LRPETEncoderDecoder, complexity, compress_model_, compressed_state_dict,
                     max_rank_excess, save_compressed)
from .hook import LRPETHook, WeightsOnlyCheckpointHook, backbone_conv_macs, build_seg_plan
from .pairing import DEFAULT_INCLUDE, is_batchnorm, pair_conv_bn

__all__ = [
    "LRPETHook", "WeightsOnlyCheckpointHook", "build_seg_plan", "backbone_conv_macs",
    "pair_conv_bn", "is_batchnorm", "DEFAULT_INCLUDE",
    "LRPETEncoderDecoder", "compress_model_", "compressed_state_dict", "save_compressed", "complexity",
    "max_rank_excess", "PLAN_KEY",
]
