"""Pair each conv of an mmdet detector with the BatchNorm after it: :mod:`lrpet_dense.openmmlab.pairing`
(mmdet's ResNet keeps its norms as mmseg's does: sibling ``bnN``, ``Sequential`` downsample; FPN and
head convs are ``ConvModule`` or plain convs, without a norm by default)."""
from lrpet_dense.openmmlab.pairing import default_include, find_norm, is_batchnorm, pair_convs, unwrap_model

__all__ = ["pair_convs", "default_include", "find_norm", "unwrap_model", "is_batchnorm"]
