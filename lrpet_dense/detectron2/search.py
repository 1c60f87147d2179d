"""LRPET-S trials for detectron2: a short LRPET training of the user's config with per-group ratios.

See :mod:`lrpet_dense.search`. Each trial runs :class:`~lrpet_dense.detectron2.LRPETTrainer` on the
config (its model, data, solver, ``MODEL.WEIGHTS`` as the starting weights) for ``iters`` iterations
with a cosine schedule and ``LRPET.OVERRIDES`` set to the trial's ratios; the model is then
factorised (checked) and evaluated with the dataset's evaluator on ``DATASETS.TEST[0]``
(``PascalVOCDetectionEvaluator``: AP50; ``COCOEvaluator``: AP).
"""
from __future__ import annotations

from typing import Mapping

from detectron2.config import CfgNode

from lrpet_dense.search import TrialRunner

from .adapter import ADAPTER, default_plan_hw
from .config import lrpet_config

__all__ = ["DetTrialRunner"]


class DetTrialRunner(TrialRunner):
    """Trials of a detectron2 config with ``LRPET.ENABLED`` (its ``LRPET`` keys select the layers).

    Args:
        cfg: the config (with ``add_lrpet_config``).
        iters: training iterations per trial (> 0).
    """

    def __init__(self, cfg: CfgNode, iters: int):
        from detectron2.data import MetadataCatalog
        from detectron2.modeling import build_model

        if not cfg.LRPET.ENABLED:
            raise ValueError("the config has LRPET.ENABLED False: the search trains with LRPET (set LRPET.ENABLED True)")
        base = lrpet_config(cfg)
        model = build_model(cfg)
        super().__init__(iters, base, model, ADAPTER, default_plan_hw(model, cfg))
        self.cfg = cfg
        kind = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("evaluator_type", None)
        if kind not in ("pascal_voc", "coco"):
            raise ValueError(f"DATASETS.TEST[0]={cfg.DATASETS.TEST[0]!r} has evaluator_type {kind!r}; the search "
                             "scores trials with 'pascal_voc' (AP50) or 'coco' (AP) datasets")
        self.metric = "AP50" if kind == "pascal_voc" else "AP"

    def train(self, overrides: Mapping[str, float], work_dir: str, seed: int):
        from detectron2.utils.env import seed_all_rng

        from .hook import LRPETHook
        from .training import LRPETTrainer

        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.LRPET.OVERRIDES = [v for k, r in overrides.items() for v in (k, float(r))]
        cfg.LRPET.RATIO, cfg.LRPET.TARGET_MACS_CUT, cfg.LRPET.TARGET_LATENCY_CUT = None, None, None
        cfg.LRPET.RANK_POLICY = "uniform"
        cfg.LRPET.INTERVAL = min(cfg.LRPET.INTERVAL, max(self.iters // 4, 1))
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.LR_SCHEDULER_NAME = self.iters, (), "WarmupCosineLR"
        cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, self.iters // 4)
        cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD = 10 ** 9, 0
        cfg.OUTPUT_DIR, cfg.SEED = work_dir, seed
        cfg.freeze()
        self.trial_cfg = cfg
        seed_all_rng(seed)
        trainer = LRPETTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        hook = next(h for h in trainer._hooks if isinstance(h, LRPETHook))
        return trainer.model, hook.plan

    def evaluate(self, model) -> float:
        from .report import evaluate_detector

        return evaluate_detector(self.trial_cfg, model)[0]
