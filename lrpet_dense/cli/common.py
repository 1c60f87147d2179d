"""Small pieces the subcommands share."""
from __future__ import annotations

import argparse

__all__ = ["DictAction"]


class DictAction(argparse.Action):
    """mmengine's ``--cfg-options KEY=VALUE`` parsing, imported only when the option is used."""

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction as MMEngineDictAction

        MMEngineDictAction(self.option_strings, self.dest, nargs=self.nargs)(parser, namespace, values, option_string)
