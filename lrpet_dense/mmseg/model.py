"""``LRPETEncoderDecoder``: an mmseg ``EncoderDecoder`` that loads compressed (factorised) LRPET checkpoints.

Registered in mmseg's ``MODELS`` on import, so ``mmseg.apis.init_model`` loads compressed checkpoints
with ``model=dict(type='LRPETEncoderDecoder')``; with ``factorized_from=`` it is built factorised, to
fine-tune a compressed model (:class:`lrpet_dense.openmmlab.LRPETModelMixin`, shared with mmdet).
"""
from __future__ import annotations

from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS

from lrpet_dense.openmmlab.model import LRPETModelMixin

__all__ = ["LRPETEncoderDecoder"]


@MODELS.register_module()
class LRPETEncoderDecoder(LRPETModelMixin, EncoderDecoder):
    """``EncoderDecoder`` that always loads compressed (factorised) LRPET checkpoints.

    Dense, it is exactly an ``EncoderDecoder`` (same arguments, same keys). Loading a state dict
    that carries a rank plan factorises the planned convs first.

    Args:
        factorized_from: a compressed checkpoint whose plan the model is built with (factorised from
            the start), so that fine-tuning it trains the factorised layers: the runner builds the
            optimizer before it loads ``load_from``, so layers installed while loading would not be
            in the optimizer (training such a model is an error). Defaults to None (dense).
        *args, **kwargs: as for ``EncoderDecoder``.
    """
