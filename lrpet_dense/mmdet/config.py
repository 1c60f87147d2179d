"""The options of an mmdet run: ``custom_hooks=[dict(type='LRPETHook', ...)]`` as an ``LRPETConfig``
(:mod:`lrpet_dense.openmmlab.config`, the same as mmseg's).

Each keyword of the hook is the field of the same name of :class:`~lrpet_dense.core.LRPETConfig`
(detectron2's ``cfg.LRPET.<KEY>`` are the same fields in upper case); the defaults are that class's.
"""
from lrpet_dense.openmmlab.config import hook_options, lrpet_config

__all__ = ["lrpet_config", "hook_options"]
