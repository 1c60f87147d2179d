"""Ordinary mmengine checkpoints load with ``torch.load(weights_only=True)``: allow-list what they hold.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10's ``CheckpointLoader``
does not opt out. A checkpoint that a stock mmengine runner writes holds, besides tensors and plain
data, mmengine's ``HistoryBuffer`` (the message hub's logs), numpy arrays, scalars and dtypes, and
the four default statistics methods of ``HistoryBuffer`` (``min``, ``max``, ``current``, ``mean``),
which pickle (protocol 2) as ``getattr(HistoryBuffer, 'min')``. Without an allow-list neither mmseg's and
mmdet's own tools (``tools/test.py``, ``load_from``, ``--resume``) nor ours can read it.

:func:`allow_mmengine_checkpoints` (run when ``lrpet_dense.mmseg`` or ``lrpet_dense.mmdet`` is imported,
so also by a config's ``custom_imports``) allow-lists exactly these: ``HistoryBuffer``, numpy's array/scalar/dtype
reconstructors (:func:`lrpet_dense.io.allow_numpy_globals`), and, under the name ``builtins.getattr``,
a *restricted* ``getattr`` that returns only those four methods of ``HistoryBuffer`` and refuses
everything else (the real ``getattr`` would open the unpickler to arbitrary attribute access).
Nothing falls back to unsafe loading: a checkpoint holding any other class is refused by
``torch.load`` with a message that names the class.

:func:`restore_legacy_buffers_` reads checkpoints that lrpet_dense 0.1's hooks wrote with the message
hub converted to plain data (``{"__lrpet_history_buffer__": True, ...}``), so those still resume.
"""
from __future__ import annotations

import pickle
from typing import Any

import torch
from mmengine.logging import HistoryBuffer

from lrpet_dense.io import allow_numpy_globals

__all__ = ["allow_mmengine_checkpoints", "restore_legacy_buffers_", "history_buffer_getattr"]

#: The statistics methods a stock ``HistoryBuffer`` pickles (its ``_set_default_statistics``).
_HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")
_LEGACY_BUFFER_TAG = "__lrpet_history_buffer__"


def history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` for the unpickler: only ``HistoryBuffer.<min|max|current|mean>``."""
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"refusing getattr({getattr(obj, '__qualname__', type(obj).__name__)!r}, {name!r}) while loading with "
        f"weights_only=True: only HistoryBuffer.{{{','.join(_HISTORY_BUFFER_METHODS)}}} are allow-listed "
        "(lrpet_dense.openmmlab.checkpoint)")


_allowed = False


def allow_mmengine_checkpoints() -> None:
    """Allow-list what stock mmengine checkpoints hold for ``torch.load(weights_only=True)``. Idempotent."""
    global _allowed
    if _allowed:
        return
    allow_numpy_globals()
    torch.serialization.add_safe_globals([HistoryBuffer, (history_buffer_getattr, "builtins.getattr")])
    _allowed = True


def _restore(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get(_LEGACY_BUFFER_TAG):
            return HistoryBuffer(value["log"], value["count"], value["max_length"])
        return type(value)((k, _restore(v)) for k, v in value.items())
    return value


def restore_legacy_buffers_(checkpoint: dict) -> None:
    """Rebuild the ``HistoryBuffer`` objects of a checkpoint written by lrpet_dense 0.1's hooks, in place."""
    if "message_hub" in checkpoint:
        checkpoint["message_hub"] = _restore(checkpoint["message_hub"])
