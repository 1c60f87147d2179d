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


def det_config(config_file: str, opts) -> "CfgNode":
    """A frozen detectron2 config with the LRPET keys: a shipped config found by name (or a path),
    then ``KEY VALUE`` opts; the toy VOC sets registered when ``$LRPET_TOY_VOC`` names one."""
    from detectron2.config import get_cfg

    from lrpet_dense.configs import resolve
    from lrpet_dense.detectron2 import add_lrpet_config, register_toy_voc_from_env

    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(resolve(config_file))
    cfg.merge_from_list(list(opts or []))
    cfg.freeze()
    register_toy_voc_from_env()
    return cfg


def seg_config(config: str, cfg_options=None) -> "Config":
    """An mmengine config found by name (or a path), with ``--cfg-options`` merged."""
    from mmengine.config import Config

    from lrpet_dense.configs import resolve

    cfg = Config.fromfile(resolve(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg
