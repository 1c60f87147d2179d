"""Measure a trained LRPET mmseg model and its compressed checkpoint for the report.

Everything is measured with mmseg's and mmengine's own machinery: models are built as
``mmseg.apis.init_model`` builds them and load strictly (:func:`~lrpet_dense.mmseg.load_model`; the
compressed one into its factorised structure, whatever the model type), params and
MACs by ``mmengine.analysis.get_model_complexity_info`` (:func:`~lrpet_dense.mmseg.count_complexity`),
accuracy by the config's ``test_dataloader`` and ``test_evaluator`` (``IoUMetric``: mIoU) run as
mmengine's ``TestLoop`` runs them. :func:`measure` returns the plain dict that
:func:`lrpet_dense.report.write_report` writes.

Example:
    >>> data = measure(cfg, "work_dirs/x/iter_100.pth", "work_dirs/x/compressed.pth")  # doctest: +SKIP
    >>> write_report(data, "work_dirs/x/report")  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict

import torch
from mmengine.config import Config
from mmengine.runner import set_random_seed
from mmengine.structures import PixelData
from torch import nn

from lrpet_dense.openmmlab.evaluation import run_test_loop
from lrpet_dense.report import RunMeasurer, measure_run

from .adapter import default_plan_hw
from .deploy import count_complexity, load_model, plan_from_checkpoint, to_inference_

__all__ = ["evaluate_segmentor", "chance_segmentor", "measure"]

logger = logging.getLogger(__name__)

# decode head type -> the model's usual name, for report titles
_SEGMENTOR_NAMES = {"PSPHead": "PSPNet", "ASPPHead": "DeepLabV3", "DepthwiseSeparableASPPHead": "DeepLabV3+",
                    "FCNHead": "FCN", "UPerHead": "UPerNet"}


def evaluate_segmentor(cfg: Config, model: nn.Module) -> Dict[str, float]:
    """The config's ``test_evaluator`` metrics (e.g. ``mIoU``) of ``model`` on its ``test_dataloader``."""
    model.eval()
    return run_test_loop(cfg, model.test_step)


def chance_segmentor(cfg: Config, label: int = 0) -> Dict[str, float]:
    """The metrics of a constant prediction (every pixel ``label``; 0 = background): the chance level."""
    def constant(data: dict) -> list:
        samples = data["data_samples"]
        for s in samples:
            s.pred_sem_seg = PixelData(data=torch.full_like(s.gt_sem_seg.data, label))
        return samples

    return run_test_loop(cfg, constant)


class _MMSegRun(RunMeasurer):
    framework = "mmseg"
    counter = ("`mmengine.analysis.get_model_complexity_info` (MACs of one inference: backbone + decode head; params "
               "of all modules, auxiliary head included)")

    load_model = staticmethod(load_model)
    plan_from_checkpoint = staticmethod(plan_from_checkpoint)
    to_inference = staticmethod(to_inference_)

    def title(self):
        bb, head = self.cfg.model.backbone, self.cfg.model.decode_head
        return f"{_SEGMENTOR_NAMES.get(head.type, head.type)} {bb.type}-{bb.get('depth', '')} (mmsegmentation)"

    def input_hw(self, model):
        return default_plan_hw(model, self.cfg)

    def complexity(self, model, hw):
        return count_complexity(model, hw)

    def forwards(self, model, hw):
        x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
        return {"model": lambda: model(x, mode="tensor"), "backbone": lambda: model.backbone(x)}

    def evaluate(self, dense, fact):
        cfg = self.cfg
        m_d, m_f, m_c = evaluate_segmentor(cfg, dense), evaluate_segmentor(cfg, fact), chance_segmentor(cfg)
        evaluator = cfg.test_evaluator
        metric = "mIoU" if "mIoU" in m_d else sorted(m_d)[0]
        return {"metric": metric,
                "dataset": f"{cfg.test_dataloader.dataset.type} {cfg.test_dataloader.dataset.get('ann_file', '')}".strip(),
                "evaluator": f"mmseg {evaluator.get('type', evaluator) if isinstance(evaluator, dict) else evaluator}",
                "dense": float(m_d[metric]), "factorized": float(m_f[metric]), "chance": float(m_c[metric]),
                "chance_method": "every pixel predicted background (the most frequent class)",
                "dataset_root": cfg.test_dataloader.dataset.get("data_root")}

    def initial_model(self, initial, dense, notes):
        from mmseg.registry import MODELS

        if initial:
            return load_model(self.cfg, initial, dense_only=True)[0], f"checkpoint `{initial}`", None
        seed = (self.cfg.get("randomness") or {}).get("seed")
        if seed is not None:
            set_random_seed(seed)
        mcfg = copy.deepcopy(self.cfg.model)
        mcfg.pretrained = None
        mcfg.pop("factorized_from", None)
        model = MODELS.build(mcfg)
        model.init_weights()
        return model, (f"a model freshly built and initialised from the config (seed {seed}); the same "
                       "initialisation scheme as the trained one, not necessarily the same draw"), None


def measure(cfg: Config, checkpoint: str, compressed: str, **options: Any) -> Dict[str, Any]:
    """Measure the projected dense ``checkpoint`` and the factorised ``compressed`` checkpoint.

    Args:
        cfg: the training config (any model type).
        checkpoint: the trained, projected checkpoint (e.g. ``iter_20000.pth``).
        compressed: its compressed checkpoint from ``tools/compress_seg.py``.
        **options: of :func:`lrpet_dense.report.measure_run` (``run_dir``: the training ``work_dir``
            with ``*/vis_data/scalars.json``; ``initial``: a checkpoint of the weights before training,
            else a model freshly initialised from the config with its ``randomness.seed``;
            ``input_hw``: default the crop size; ``evaluate``; latency options).

    Returns:
        The report data (see :func:`lrpet_dense.report.write_report`).
    """
    options.setdefault("config", getattr(cfg, "filename", None))
    return measure_run(_MMSegRun(cfg), checkpoint, compressed, **options)
