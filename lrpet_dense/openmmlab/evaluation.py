"""Evaluate a model as mmengine's ``TestLoop`` does: the config's ``test_dataloader`` and ``test_evaluator``.

Shared by the mmseg and mmdet reports and searches (``mIoU`` of ``IoUMetric``, ``pascal_voc/mAP`` of
``VOCMetric``, ...); ``predict`` may be a model's ``test_step`` or a stand-in (a chance-level predictor).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict

import torch

__all__ = ["run_test_loop"]


def run_test_loop(cfg, predict: Callable[[dict], list]) -> Dict[str, float]:
    """What mmengine's ``TestLoop`` does, with ``predict(data_batch) -> data samples`` as the model.

    Args:
        cfg: an mmengine ``Config`` with ``test_dataloader`` and ``test_evaluator`` (not modified).
        predict: the model's ``test_step``, or any function of a data batch returning its data samples
            with predictions.

    Returns:
        The evaluator's metrics (e.g. ``{"mIoU": ...}``, ``{"pascal_voc/mAP": ...}``).
    """
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner

    loader = Runner.build_dataloader(copy.deepcopy(cfg.test_dataloader))
    evaluator = Evaluator(copy.deepcopy(cfg.test_evaluator))
    evaluator.dataset_meta = loader.dataset.metainfo
    with torch.no_grad():
        for data in loader:
            evaluator.process(data_samples=predict(data), data_batch=data)
    return evaluator.evaluate(len(loader.dataset))
