"""LRPET for dense prediction: low-rank projection with energy transfer for detectron2 and mmseg.

``import lrpet_dense`` loads only the torch core (:mod:`lrpet_dense.core`, whose public names it
re-exports), which trains any ``nn.Module`` in a plain PyTorch loop (:func:`prepare` ->
:class:`LRPETSession`, :func:`compress_model_`, :func:`save_compressed`, :func:`load_compressed_`:
``docs/pytorch.md``); the framework adapters live in ``lrpet_dense.detectron2`` and
``lrpet_dense.mmseg`` and are imported explicitly. The command line is ``lrpet-dense`` (:mod:`lrpet_dense.cli`).
"""
from . import core
from .core import *  # noqa: F401,F403  (the public API: lrpet_dense.core.__all__)

__version__ = "0.2.0"
__all__ = list(core.__all__)
