"""Measure a trained LRPET mmdet detector and its compressed checkpoint for the report.

Everything is measured with mmdet's and mmengine's own machinery: models are built as
``mmdet.apis.init_detector`` builds them and load strictly (:func:`~lrpet_dense.mmdet.load_model`; the
compressed one into its factorised structure, whatever the model type), params and MACs by
``mmengine.analysis.get_model_complexity_info`` (:func:`~lrpet_dense.mmdet.count_complexity`),
accuracy by the config's ``test_dataloader`` and ``test_evaluator`` (``VOCMetric``: mAP at IoU 0.5;
``CocoMetric``: bbox mAP) run as mmengine's ``TestLoop`` runs them, in percent. :func:`measure`
returns the plain dict that :func:`lrpet_dense.report.write_report` writes.

Example:
    >>> data = measure(cfg, "work_dirs/x/epoch_4.pth", "work_dirs/x/compressed.pth")  # doctest: +SKIP
    >>> write_report(data, "work_dirs/x/report")  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Tuple

import torch
from mmengine.config import Config
from mmengine.runner import set_random_seed
from torch import nn

from lrpet_dense.openmmlab.evaluation import run_test_loop
from lrpet_dense.report import RunMeasurer, measure_run

from .adapter import default_plan_hw
from .deploy import count_complexity, load_model, plan_from_checkpoint, to_inference_
from .model import RawOutputs, counted_proposals, padded_hw

__all__ = ["evaluate_detector", "chance_detector", "box_metric", "measure"]

logger = logging.getLogger(__name__)

#: Evaluator metric keys in order of preference: the headline box metric of VOCMetric / CocoMetric.
_METRICS = ("pascal_voc/mAP", "coco/bbox_mAP", "coco/bbox_mAP_50")
_TITLES = {"FasterRCNN": "Faster R-CNN", "RetinaNet": "RetinaNet", "MaskRCNN": "Mask R-CNN", "FCOS": "FCOS"}


def box_metric(metrics: Dict[str, float]) -> str:
    """The headline box metric among an mmdet evaluator's results (``pascal_voc/mAP``, ``coco/bbox_mAP``).

    Raises:
        ValueError: none of them is there.
    """
    for key in _METRICS:
        if key in metrics:
            return key
    raise ValueError(f"the test_evaluator reports {sorted(metrics)}; the report knows {list(_METRICS)}")


def evaluate_detector(cfg: Config, model: nn.Module) -> Dict[str, float]:
    """The config's ``test_evaluator`` metrics of ``model`` on its ``test_dataloader`` (mmdet's scale, 0-1)."""
    model.eval()
    return run_test_loop(cfg, model.test_step)


def _max_per_img(cfg: Config) -> int:
    test_cfg = cfg.model.get("test_cfg") or {}
    test_cfg = test_cfg.get("rcnn", test_cfg) or {}
    return int(test_cfg.get("max_per_img", 100))


def chance_detector(cfg: Config, seed: int = 0) -> Tuple[Dict[str, float], str]:
    """The metrics of a detector that ignores the image, by the same evaluator: the chance level.

    It predicts the config's ``max_per_img`` boxes per image with uniformly random corners (in the
    original image), scores and classes.

    Returns:
        ``(metrics, description)``.
    """
    from mmengine.structures import InstanceData

    n = _max_per_img(cfg)
    gen = torch.Generator().manual_seed(seed)

    def random_boxes(data: dict) -> list:
        samples = data["data_samples"]
        num_classes = len(samples[0].metainfo.get("classes", ())) or 80
        for s in samples:
            h, w = s.metainfo["ori_shape"][:2]
            pts = torch.rand(n, 4, generator=gen) * torch.tensor([w, h, w, h], dtype=torch.float32)
            boxes = torch.cat([torch.minimum(pts[:, :2], pts[:, 2:]), torch.maximum(pts[:, :2], pts[:, 2:])], 1)
            s.pred_instances = InstanceData(bboxes=boxes, scores=torch.rand(n, generator=gen),
                                            labels=torch.randint(num_classes, (n,), generator=gen))
        return samples

    return run_test_loop(cfg, random_boxes), f"{n} uniformly random boxes/image, random class and score"


class _MMDetRun(RunMeasurer):
    framework = "mmdet"
    counter = ("`mmengine.analysis.get_model_complexity_info` (MACs of one inference up to the heads' raw outputs, the "
               "ROI head on the test-time proposal count; params of all modules)")

    load_model = staticmethod(load_model)
    plan_from_checkpoint = staticmethod(plan_from_checkpoint)
    to_inference = staticmethod(to_inference_)

    def title(self):
        model = self.cfg.model
        name = str(model.type)
        name = name[len("LRPET"):] if name.startswith("LRPET") else name
        neck = "-FPN" if (model.get("neck") or {}).get("type") == "FPN" else ""
        depth = model.backbone.get("depth", "")
        return f"{_TITLES.get(name, name)} {model.backbone.type}-{depth}{neck} (mmdetection)"

    def input_hw(self, model):
        return default_plan_hw(model, self.cfg)

    def complexity(self, model, hw):
        return count_complexity(model, hw)

    def forwards(self, model, hw):
        h, w = padded_hw(model, hw)
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
        raw = RawOutputs(model, counted_proposals(model))
        return {"model": lambda: raw(x), "backbone": lambda: model.backbone(x)}

    def evaluate(self, dense, fact):
        cfg = self.cfg
        m_d, m_f = evaluate_detector(cfg, dense), evaluate_detector(cfg, fact)
        m_c, how = chance_detector(cfg)
        metric = box_metric(m_d)
        evaluator = cfg.test_evaluator
        data = cfg.test_dataloader.dataset
        return {"metric": metric + " (%)",
                "dataset": f"{data.type} {data.get('ann_file', '')}".strip(),
                "evaluator": f"mmdet {evaluator.get('type', evaluator) if isinstance(evaluator, dict) else evaluator}",
                "dense": 100 * float(m_d[metric]), "factorized": 100 * float(m_f[metric]),
                "chance": 100 * float(m_c[metric]), "chance_method": how, "dataset_root": data.get("data_root")}

    def initial_model(self, initial, dense, notes):
        from mmdet.registry import MODELS
        from mmengine.registry import init_default_scope

        if initial:
            return load_model(self.cfg, initial, dense_only=True)[0], f"checkpoint `{initial}`", None
        seed = (self.cfg.get("randomness") or {}).get("seed")
        if seed is not None:
            set_random_seed(seed)
        init_default_scope(self.cfg.get("default_scope", "mmdet"))
        mcfg = copy.deepcopy(self.cfg.model)
        mcfg.pop("factorized_from", None)
        model = MODELS.build(mcfg)
        model.init_weights()
        return model, (f"a model freshly built and initialised from the config (seed {seed}); the same "
                       "initialisation scheme as the trained one, not necessarily the same draw"), None


def measure(cfg: Config, checkpoint: str, compressed: str, **options: Any) -> Dict[str, Any]:
    """Measure the projected dense ``checkpoint`` and the factorised ``compressed`` checkpoint.

    Args:
        cfg: the training config (any model type).
        checkpoint: the trained, projected checkpoint (e.g. ``epoch_4.pth``, ``iter_N.pth``).
        compressed: its compressed checkpoint from ``lrpet-dense compress mmdet``.
        **options: of :func:`lrpet_dense.report.measure_run` (``run_dir``: the training ``work_dir``
            with ``*/vis_data/scalars.json``; ``initial``: a checkpoint of the weights before training,
            else a model freshly initialised from the config with its ``randomness.seed``;
            ``input_hw``: default the short side of the test scale, squared; ``evaluate``; latency options).

    Returns:
        The report data (see :func:`lrpet_dense.report.write_report`).
    """
    options.setdefault("config", getattr(cfg, "filename", None))
    return measure_run(_MMDetRun(cfg), checkpoint, compressed, **options)
