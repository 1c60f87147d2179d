"""LRPET for mmsegmentation: the ``LRPETHook``, conv-BN pairing, and factorised deployment.

Importing this package registers :class:`LRPETHook` in mmengine's ``HOOKS`` registry and
:class:`LRPETEncoderDecoder` in mmseg's ``MODELS`` registry, and allow-lists for
``torch.load(weights_only=True)`` what stock mmengine checkpoints hold
(:mod:`lrpet_dense.mmseg.checkpoint`), so a config only needs::

    custom_imports = dict(imports=['lrpet_dense.mmseg'], allow_failed_imports=False)
    custom_hooks = [dict(type='LRPETHook', target_macs_cut=0.3, interval=500)]
"""
from .checkpoint import allow_mmengine_checkpoints
from .deploy import (PLAN_KEY, LRPETEncoderDecoder, complexity, compress_model_, compressed_state_dict, load_model,
                     max_rank_excess, plan_from_checkpoint, save_compressed)
from .hook import LRPETHook, backbone_conv_macs, build_seg_plan
from .pairing import DEFAULT_INCLUDE, is_batchnorm, pair_conv_bn

allow_mmengine_checkpoints()

__all__ = [
    "LRPETHook", "build_seg_plan", "backbone_conv_macs", "allow_mmengine_checkpoints",
    "pair_conv_bn", "is_batchnorm", "DEFAULT_INCLUDE",
    "LRPETEncoderDecoder", "compress_model_", "compressed_state_dict", "save_compressed", "complexity",
    "max_rank_excess", "PLAN_KEY", "load_model", "plan_from_checkpoint",
]
