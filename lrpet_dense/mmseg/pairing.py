"""Pair each conv of an mmseg segmentor with the BatchNorm after it: :mod:`lrpet_dense.openmmlab.pairing`
(mmseg and mmdet keep their norms alike: sibling ``bnN``, ``Sequential``, ``ConvModule``)."""
from lrpet_dense.openmmlab.pairing import default_include, find_norm, is_batchnorm, pair_convs, unwrap_model

__all__ = ["pair_convs", "default_include", "find_norm", "unwrap_model", "is_batchnorm"]
