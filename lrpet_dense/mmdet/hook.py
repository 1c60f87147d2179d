"""``LRPETHook`` in mmdet: the OpenMMLab hook (:mod:`lrpet_dense.openmmlab.hook`, shared with mmseg), and
mmdet's :func:`build_plan`.

Usage in a config (two lines added to any mmdet config whose backbone has BatchNorms)::

    custom_imports = dict(imports=['lrpet_dense.mmdet'], allow_failed_imports=False)
    custom_hooks = [dict(type='LRPETHook', target_macs_cut=0.3, interval=500)]
    model = dict(type='LRPETFasterRCNN')  # to load compressed checkpoints anywhere (LRPETRetinaNet, ...)

A config's ``dict(type='LRPETHook')`` is the shared hook, registered in mmengine's root ``HOOKS``: it
serves the runner's model with the adapter of its task. :class:`LRPETHook` here is that hook bound to
the mmdet adapter, for Python code that drives it on a model that is not an mmdet ``BaseDetector``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import nn

from lrpet_dense.core import ConvBN, LRPETConfig, RankPlan
from lrpet_dense.openmmlab.hook import LRPETHook as OpenMMLabHook

from .adapter import ADAPTER, default_plan_hw

__all__ = ["LRPETHook", "build_plan", "default_plan_hw"]


class LRPETHook(OpenMMLabHook):
    """The OpenMMLab ``LRPETHook`` with the mmdet adapter (see the module docs); the same keyword options."""

    adapter = ADAPTER


def build_plan(model: nn.Module, layers: Sequence[ConvBN], config: LRPETConfig,
               input_hw: Optional[Tuple[int, int]] = None) -> RankPlan:
    """The rank plan of ``layers`` of an mmdet detector (ratio, MAC cut, or energy allocation).

    Output sizes come from a dummy forward of the backbone at ``config.plan_input_size`` (default:
    ``input_hw``, else :func:`default_plan_hw`), padded as the data preprocessor pads; BN statistics
    untouched. The MAC cut is measured against **all** the backbone's convs (frozen stages included),
    so ``target_macs_cut=0.3`` means 30% of the backbone's conv MACs, whatever the selection. Selected
    neck or head convs are measured on a whole-detector forward. Selected convs whose factorised form
    would not save MACs are left out of the plan, unless named exactly in ``include`` or ``overrides``.
    """
    return ADAPTER.build_plan(model, layers, config, input_hw)
