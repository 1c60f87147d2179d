"""LRPET for dense prediction: low-rank projection with energy transfer for detectron2 and mmseg.

``import lrpet_dense`` loads only the torch core; the framework adapters live in
``lrpet_dense.detectron2`` and ``lrpet_dense.mmseg`` and are imported explicitly.
"""
from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all

__version__ = "0.1.0"
__all__ = list(_core_all)
