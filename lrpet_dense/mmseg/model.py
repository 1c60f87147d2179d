"""``LRPETEncoderDecoder``: an mmseg ``EncoderDecoder`` that loads compressed (factorised) LRPET checkpoints.

Registered in mmseg's ``MODELS`` on import, so ``mmseg.apis.init_model`` loads compressed checkpoints
with ``model=dict(type='LRPETEncoderDecoder')``; with ``factorized_from=`` it is built factorised, to
fine-tune a compressed model.
"""
from __future__ import annotations

from typing import Optional

from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS

from lrpet_dense.core import RankPlan, enable_compressed_loading_, factorize_
from lrpet_dense.core.factorize import check_trainable_, model_plan

from .adapter import ADAPTER

__all__ = ["LRPETEncoderDecoder"]


@MODELS.register_module()
class LRPETEncoderDecoder(EncoderDecoder):
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

    def __init__(self, *args, factorized_from: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        enable_compressed_loading_(self)
        if factorized_from is not None:
            plan = ADAPTER.compressed_plan_of(factorized_from)
            if plan is None:
                raise ValueError(f"factorized_from={factorized_from!r} is not a compressed checkpoint (no LRPET plan "
                                 "in its state dict); give the output of tools/compress_seg.py")
            factorize_(self, plan, from_weights=False)

    def loss(self, inputs, data_samples):
        check_trainable_(self)  # not silently "fine-tuning" layers the optimizer does not hold
        return super().loss(inputs, data_samples)

    @property
    def lrpet_plan(self) -> Optional[RankPlan]:
        """The plan of the factorised layers installed, or None while dense."""
        return model_plan(self)
