"""LRPET-S trials for mmseg: a short LRPET training of the user's config with per-group ratios, scored by mIoU.

See :mod:`lrpet_dense.search` and :class:`lrpet_dense.openmmlab.search.OpenMMLabTrialRunner` (the trial,
shared with mmdet): each trial runs mmengine's runner on the config for ``iters`` iterations with the
``LRPETHook`` options of the config and the trial's overrides, then factorises (checked) and evaluates
with the config's ``test_evaluator`` on its ``test_dataloader``.
"""
from __future__ import annotations

from typing import Optional

from mmengine.config import Config

from lrpet_dense.openmmlab.search import OpenMMLabTrialRunner

from .adapter import ADAPTER

__all__ = ["SegTrialRunner"]


class SegTrialRunner(OpenMMLabTrialRunner):
    """Trials of an mmseg config that has an ``LRPETHook`` (its options select the layers).

    Args:
        cfg: the mmengine config (with ``custom_hooks=[dict(type='LRPETHook', ...)]``).
        iters: training iterations per trial (> 0).
        load_from: starting weights (default: the config's ``load_from``; None = random init).
    """

    metric = "mIoU"

    def __init__(self, cfg: Config, iters: int, load_from: Optional[str] = None):
        super().__init__(cfg, iters, ADAPTER, load_from)

    def evaluate(self, model) -> float:
        from .report import evaluate_segmentor

        return evaluate_segmentor(self.trial_cfg, model)[self.metric]
