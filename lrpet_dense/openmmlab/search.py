"""LRPET-S trials for OpenMMLab configs: a short LRPET training of the user's config with per-group ratios.

See :mod:`lrpet_dense.search`. Each trial runs mmengine's runner on the config (its model, data,
optimizer, ``load_from`` as the starting weights) for ``iters`` iterations with a poly schedule
annealed to 1e-4 and the ``LRPETHook`` options of the config with the trial's overrides; the model
is then factorised (checked) and evaluated with the config's ``test_evaluator`` on its
``test_dataloader``. The task packages supply the metric (:class:`lrpet_dense.mmseg.search.SegTrialRunner`,
:class:`lrpet_dense.mmdet.search.MMDetTrialRunner`).
"""
from __future__ import annotations

import copy
import os
from typing import Mapping, Optional

from lrpet_dense.search import TrialRunner

from .adapter import OpenMMLabAdapter
from .config import lrpet_config

__all__ = ["OpenMMLabTrialRunner"]


class OpenMMLabTrialRunner(TrialRunner):
    """Trials of an mmengine config that has an ``LRPETHook`` (its options select the layers).

    Args:
        cfg: the mmengine config (with ``custom_hooks=[dict(type='LRPETHook', ...)]``).
        iters: training iterations per trial (> 0).
        adapter: the task's adapter.
        load_from: starting weights (default: the config's ``load_from``; None = random init).
    """

    def __init__(self, cfg, iters: int, adapter: OpenMMLabAdapter, load_from: Optional[str] = None):
        base = lrpet_config(cfg)  # raises when the config has no LRPETHook
        self.load_from = load_from if load_from is not None else cfg.get("load_from")
        model, _ = adapter.load_model(cfg, self.load_from)
        super().__init__(iters, base, model, adapter, adapter.default_input_hw(model, cfg))
        self.cfg = cfg

    def train(self, overrides: Mapping[str, float], work_dir: str, seed: int):
        from mmengine.runner import Runner

        from .hook import LRPETHook

        cfg = copy.deepcopy(self.cfg)
        cfg.work_dir = work_dir
        cfg.experiment_name = f"lrpet_search_{os.path.basename(work_dir)}_{os.getpid()}"
        cfg.load_from, cfg.resume = self.load_from, False
        hooks = [dict(h) for h in cfg.get("custom_hooks", []) if dict(h).get("type") != "LRPETHook"]
        options = self.trial_config(overrides).to_dict()
        options["interval"] = min(options["interval"], max(self.iters // 4, 1))
        cfg.custom_hooks = hooks + [dict(type="LRPETHook", **options)]
        cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=self.iters, val_interval=10 ** 9)
        cfg.param_scheduler = [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=self.iters, by_epoch=False)]
        cfg.default_hooks.checkpoint = None
        cfg.randomness = dict(seed=seed)
        self.trial_cfg = cfg
        runner = Runner.from_cfg(cfg)
        runner.train()
        hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
        return runner.model, hook.plan
