"""The options of an OpenMMLab run: ``custom_hooks=[dict(type='LRPETHook', ...)]`` as an ``LRPETConfig``.

Each keyword of the ``LRPETHook`` is the field of the same name of :class:`~lrpet_dense.core.LRPETConfig`
(detectron2's ``cfg.LRPET.<KEY>`` are the same fields in upper case); the defaults are that class's.
The same in mmseg and mmdet configs.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from lrpet_dense.core import LRPETConfig

__all__ = ["lrpet_config", "hook_options", "task_package"]

#: mmengine's default scope of a config -> the lrpet_dense package that serves it
_PACKAGES = {"mmseg": "lrpet_dense.mmseg", "mmdet": "lrpet_dense.mmdet"}


def task_package(cfg: Mapping[str, Any]) -> str:
    """The lrpet_dense package a config needs in ``custom_imports`` (from its ``default_scope``)."""
    return _PACKAGES.get(str(cfg.get("default_scope") or ""), "lrpet_dense.mmseg' or 'lrpet_dense.mmdet")


def hook_options(cfg: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The keyword options of the config's ``LRPETHook`` (``custom_hooks``), or None without one.

    Raises:
        ValueError: the config has several ``LRPETHook`` entries.
    """
    hooks = [dict(h) for h in (cfg.get("custom_hooks") or []) if dict(h).get("type") in ("LRPETHook",)]
    if len(hooks) > 1:
        raise ValueError(f"the config has {len(hooks)} LRPETHook entries in custom_hooks; keep one")
    if not hooks:
        return None
    options = hooks[0]
    options.pop("type")
    options.pop("priority", None)
    return options


def lrpet_config(cfg: Mapping[str, Any], **changes: Any) -> LRPETConfig:
    """The config's ``LRPETHook`` options (updated with ``changes``) as an :class:`~lrpet_dense.core.LRPETConfig`.

    Raises:
        ValueError: the config has no ``LRPETHook`` and no ``changes`` are given, or an option is bad
            (the message names it as the hook's keyword, with its value and the allowed range).
    """
    options = hook_options(cfg)
    if options is None and not changes:
        raise ValueError("the config has no LRPETHook in custom_hooks; add custom_hooks=[dict(type='LRPETHook', "
                         f"...)] (and custom_imports=dict(imports=['{task_package(cfg)}']))")
    return LRPETConfig.from_kwargs({**(options or {}), **changes}, who="LRPETHook")
