"""LRPET-S trials for mmdet: a short LRPET training of the user's config with per-group ratios, scored by box mAP.

See :mod:`lrpet_dense.search` and :class:`lrpet_dense.openmmlab.search.OpenMMLabTrialRunner` (the trial,
shared with mmseg): each trial runs mmengine's runner on the config for ``iters`` iterations with the
``LRPETHook`` options of the config and the trial's overrides, then factorises (checked) and evaluates
with the config's ``test_evaluator`` on its ``test_dataloader`` (``pascal_voc/mAP`` or
``coco/bbox_mAP``, in percent).
"""
from __future__ import annotations

from typing import Optional

from mmengine.config import Config

from lrpet_dense.openmmlab.search import OpenMMLabTrialRunner

from .adapter import ADAPTER

__all__ = ["MMDetTrialRunner"]


class MMDetTrialRunner(OpenMMLabTrialRunner):
    """Trials of an mmdet config that has an ``LRPETHook`` (its options select the layers).

    Args:
        cfg: the mmengine config (with ``custom_hooks=[dict(type='LRPETHook', ...)]``).
        iters: training iterations per trial (> 0).
        load_from: starting weights (default: the config's ``load_from``; None = the config's initialisation).
    """

    metric = "box mAP (%)"

    def __init__(self, cfg: Config, iters: int, load_from: Optional[str] = None):
        super().__init__(cfg, iters, ADAPTER, load_from)

    def evaluate(self, model) -> float:
        from .report import box_metric, evaluate_detector

        metrics = evaluate_detector(self.trial_cfg, model)
        return 100 * float(metrics[box_metric(metrics)])
