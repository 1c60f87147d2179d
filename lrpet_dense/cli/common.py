"""Small pieces the subcommands share."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the frameworks are imported only when a subcommand runs
    from detectron2.config import CfgNode
    from mmengine.config import Config

__all__ = ["DictAction", "det_config", "seg_config"]


class DictAction(argparse.Action):
    """mmengine's ``--cfg-options KEY=VALUE`` parsing, imported only when the option is used."""

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction as MMEngineDictAction

        MMEngineDictAction(self.option_strings, self.dest, nargs=self.nargs)(parser, namespace, values, option_string)


def _lazyconfig_error(path: str) -> str:
    """The error for a Python file given where a detectron2 yacs config (``.yaml``) is expected."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(200_000)
    except (OSError, UnicodeDecodeError):
        text = ""
    if any(mark in text for mark in ("LazyCall", "detectron2", "_target_", "get_config(")):
        return (f"{path} is a detectron2 LazyConfig (Python); the detectron2 commands of lrpet-dense (train-det, "
                "compress/report/export/search det) read yacs configs (.yaml). For a LazyConfig, train with "
                f"'python examples/detectron2_lazyconfig_train.py --config-file {path}' and compress / export in "
                "Python: docs/detectron2.md, section 'LazyConfig'")
    return (f"{path} is a Python config, not a detectron2 yacs config (.yaml): an mmseg config goes to the 'seg' "
            "commands (lrpet-dense compress|report|export|search seg); a detectron2 LazyConfig is trained with "
            "examples/detectron2_lazyconfig_train.py and compressed in Python (docs/detectron2.md, 'LazyConfig')")


def det_config(config_file: str, opts, *, register: bool = True) -> "CfgNode":
    """A frozen detectron2 config with the LRPET keys: a shipped config found by name (or a path),
    then ``KEY VALUE`` opts; the toy VOC sets registered when ``$LRPET_TOY_VOC`` names one (``register``).

    Every ``cfg.LRPET`` option is checked here (:func:`~lrpet_dense.detectron2.lrpet_config`), before
    any model, data loader or output file is built.

    Raises:
        ValueError: a LazyConfig (or another Python config) given where a yacs config is expected, an
            unknown key or a wrongly typed value, or an LRPET option out of range (one line, naming the key,
            the value and the allowed range).
        FileNotFoundError: no such config.
    """
    from detectron2.config import get_cfg

    from lrpet_dense.configs import resolve
    from lrpet_dense.detectron2 import add_lrpet_config, lrpet_config, register_toy_voc_from_env

    path = resolve(config_file)
    if path.endswith(".py"):
        raise ValueError(_lazyconfig_error(path))
    cfg = get_cfg()
    add_lrpet_config(cfg)
    try:
        cfg.merge_from_file(path)
    except (KeyError, AssertionError, AttributeError) as e:  # yacs: unknown key, bad _BASE_, not a mapping
        raise ValueError(f"{path} is not a detectron2 yacs config this command can read: "
                         f"{e.args[0] if e.args else type(e).__name__}") from None
    try:
        cfg.merge_from_list(list(opts or []))
    except (KeyError, AssertionError) as e:  # yacs: "Non-existent config key: ...", an odd KEY VALUE list
        raise ValueError(f"the command line's KEY VALUE pairs: {e.args[0] if e.args else type(e).__name__}") from None
    cfg.freeze()
    lrpet_config(cfg)  # every LRPET option checked now, before anything is built or written
    if register:
        register_toy_voc_from_env()
    return cfg


def seg_config(config: str, cfg_options=None) -> "Config":
    """An mmengine config found by name (or a path), with ``--cfg-options`` merged.

    The options of its ``LRPETHook`` (when it has one) are checked here
    (:func:`~lrpet_dense.mmseg.lrpet_config`), before any model, data loader or output file is built.

    Raises:
        ValueError: an ``LRPETHook`` option out of range (naming it, the value and the allowed range).
    """
    from mmengine.config import Config

    from lrpet_dense.configs import resolve
    from lrpet_dense.mmseg.config import hook_options, lrpet_config

    cfg = Config.fromfile(resolve(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if hook_options(cfg) is not None:
        lrpet_config(cfg)  # every LRPET option checked now, before anything is built or written
    return cfg
