"""The project's configs, shipped with the package and found by name from any working directory.

In the spirit of detectron2's ``model_zoo.get_config_file`` and OpenMMLab's ``mim``: a config is named
by its path relative to this folder (``faster_rcnn_lrpet.yaml``, ``toy/faster_rcnn_lrpet_quickstart.yaml``;
a leading ``configs/`` is accepted, as in a checkout), and :func:`resolve` takes a plain path first::

    from lrpet_dense.configs import config_path
    config_path("pspnet_r50-d8_lrpet_voc12aug-512x512.py")   # an absolute path

    lrpet-dense config-path pspnet_r50-d8_lrpet_voc12aug-512x512.py   # the same, on the command line

detectron2 configs (``.yaml``) are read by ``lrpet-dense train-det`` / ``tools/train_det.py``; mmseg and
mmdet configs (``.py``) by mmseg's and mmdet's own tools, given the path: ``python <mmseg>/tools/train.py
"$(lrpet-dense config-path NAME)"``. An mmseg or mmdet config of your own inherits one of ours by its
path (mmengine's ``pkg::`` scope is reserved to OpenMMLab packages; see docs/mmseg.md and docs/mmdet.md).
``toy/det_toy_runtime.py`` is not a config of its own: the data and schedule the toy mmdet configs share.
"""
from __future__ import annotations

import logging
import os
from typing import List

__all__ = ["config_dir", "config_path", "list_configs", "resolve"]

logger = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml", ".py")


def config_dir() -> str:
    """The folder of the shipped configs."""
    return os.path.dirname(os.path.abspath(__file__))


def list_configs() -> List[str]:
    """The names of every shipped config (paths relative to :func:`config_dir`), sorted."""
    root = config_dir()
    names = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(_SUFFIXES) and f != "__init__.py":
                names.append(os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/"))
    return sorted(names)


def config_path(name: str) -> str:
    """The absolute path of the shipped config ``name``.

    Raises:
        FileNotFoundError: no shipped config has that name; the message lists them.
    """
    rel = name.replace("\\", "/")
    for candidate in (rel, rel[len("configs/"):] if rel.startswith("configs/") else None):
        if candidate and not os.path.isabs(candidate):
            path = os.path.normpath(os.path.join(config_dir(), candidate))
            if path.startswith(config_dir() + os.sep) and os.path.isfile(path) and path.endswith(_SUFFIXES):
                return path
    raise FileNotFoundError(f"config {name!r} is neither a file nor one of the configs shipped with lrpet_dense: "
                            f"{', '.join(list_configs())}")


def resolve(name: str) -> str:
    """A config file: ``name`` itself when it is an existing file, else the shipped config of that name.

    The path used is logged. Raises ``FileNotFoundError`` listing the shipped configs when neither exists.
    """
    if os.path.isfile(name):
        path = os.path.abspath(name)
    else:
        path = config_path(name)
    logger.info("config: %s", path)
    return path
