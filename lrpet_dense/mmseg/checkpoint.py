"""Moved to :mod:`lrpet_dense.openmmlab.checkpoint` (shared by mmseg and mmdet); these names still work."""
from lrpet_dense.openmmlab.checkpoint import allow_mmengine_checkpoints, history_buffer_getattr, restore_legacy_buffers_

__all__ = ["allow_mmengine_checkpoints", "restore_legacy_buffers_", "history_buffer_getattr"]
