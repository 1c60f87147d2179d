"""Measure a trained LRPET detectron2 model and its compressed checkpoint for the report.

Everything is measured with detectron2's own machinery: models are built by ``build_model`` and
load strictly (:func:`~lrpet_dense.detectron2.deploy.load_model`; the compressed one into its
factorised structure, whatever the meta architecture), params and MACs by
``FlopCountAnalysis`` (:func:`~lrpet_dense.detectron2.count_complexity`), accuracy by
``inference_on_dataset`` with ``PascalVOCDetectionEvaluator`` (AP50) or ``COCOEvaluator`` (AP).
:func:`measure` returns the plain dict that :func:`lrpet_dense.report.write_report` writes.

Example:
    >>> data = measure(cfg, "output/model_final.pth", "output/model_compressed.pth")  # doctest: +SKIP
    >>> write_report(data, "output/report")  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import tempfile
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.env import seed_all_rng

from lrpet_dense.report import RunMeasurer, initial_weights_match, measure_run

from .adapter import default_plan_hw
from .deploy import count_complexity, load_model, plan_from_checkpoint, to_inference_

__all__ = ["evaluate_detector", "chance_detector", "measure"]

logger = logging.getLogger(__name__)


def _evaluator(cfg: CfgNode, dataset_name: str, output_dir: str):
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if kind == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name), "AP50", "detectron2 PascalVOCDetectionEvaluator (VOC07 11-point AP at IoU 0.5)"
    if kind == "coco":
        return COCOEvaluator(dataset_name, output_dir=output_dir), "AP", "detectron2 COCOEvaluator (AP at IoU 0.5:0.95)"
    raise ValueError(f"dataset {dataset_name!r} has evaluator_type {kind!r}; the report knows 'pascal_voc' and 'coco'")


def evaluate_detector(cfg: CfgNode, model: nn.Module, dataset_name: Optional[str] = None) -> Tuple[float, str, str]:
    """Box accuracy of ``model`` on ``dataset_name`` (default: ``cfg.DATASETS.TEST[0]``).

    Returns:
        ``(value, metric name, evaluator description)``: AP50 for VOC datasets, AP for COCO ones.
    """
    dataset_name = dataset_name or cfg.DATASETS.TEST[0]
    with tempfile.TemporaryDirectory(prefix="lrpet_eval_") as tmp:
        evaluator, metric, desc = _evaluator(cfg, dataset_name, tmp)
        res = inference_on_dataset(model, build_detection_test_loader(cfg, dataset_name), evaluator)
    return float(res["bbox"][metric]), metric, desc


class _RandomBoxes(nn.Module):
    """A detector that ignores the image: ``per_image`` uniformly random boxes, scores and classes."""

    def __init__(self, classes: Sequence[int], per_image: int, seed: int):
        super().__init__()
        self.classes = torch.tensor(list(classes), dtype=torch.long)
        self.per_image = per_image
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, inputs):
        outs = []
        for x in inputs:
            h, w = int(x["height"]), int(x["width"])
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            pts = torch.rand(self.per_image, 4, generator=self.gen) * scale
            boxes = torch.cat([torch.minimum(pts[:, :2], pts[:, 2:]), torch.maximum(pts[:, :2], pts[:, 2:])], 1)
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(boxes)
            inst.scores = torch.rand(self.per_image, generator=self.gen)
            inst.pred_classes = self.classes[torch.randint(len(self.classes), (self.per_image,), generator=self.gen)]
            outs.append({"instances": inst})
        return outs


def chance_detector(cfg: CfgNode, dataset_name: Optional[str] = None, seed: int = 0) -> Tuple[float, str]:
    """Accuracy of a detector that ignores the image, by the same evaluator: the chance level.

    It outputs ``cfg.TEST.DETECTIONS_PER_IMAGE`` boxes per image with uniformly random corners,
    scores and classes (among the dataset's classes).

    Returns:
        ``(value, description)``.
    """
    dataset_name = dataset_name or cfg.DATASETS.TEST[0]
    classes = range(len(MetadataCatalog.get(dataset_name).thing_classes))
    n = int(cfg.TEST.DETECTIONS_PER_IMAGE)
    with tempfile.TemporaryDirectory(prefix="lrpet_eval_") as tmp:
        evaluator, metric, _ = _evaluator(cfg, dataset_name, tmp)
        res = inference_on_dataset(_RandomBoxes(classes, n, seed), build_detection_test_loader(cfg, dataset_name),
                                   evaluator)
    return float(res["bbox"][metric]), f"{n} uniformly random boxes/image, random class and score"


class _Detectron2Run(RunMeasurer):
    framework = "detectron2"
    counter = "detectron2 `FlopCountAnalysis` (fvcore; one multiply-accumulate counted as one flop)"

    load_model = staticmethod(load_model)
    plan_from_checkpoint = staticmethod(plan_from_checkpoint)
    to_inference = staticmethod(to_inference_)
    check_hw = (160, 160)  # the deploy copies are checked at up to 160 px (the adapters' default check is 64 px)

    def __init__(self, cfg: CfgNode):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = "", "cpu"
        cfg.freeze()
        super().__init__(cfg)

    def title(self):
        cfg = self.cfg
        kind = "C4" if cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads" else "FPN"
        return f"Faster R-CNN R{cfg.MODEL.RESNETS.DEPTH}-{kind} (detectron2)"

    def input_hw(self, model):
        return default_plan_hw(model, self.cfg)

    def complexity(self, model, hw):
        return count_complexity(model, hw)

    def forwards(self, model, hw):
        image = torch.rand(3, *hw, generator=torch.Generator().manual_seed(0)) * 255
        inputs = [{"image": image.to(model.device), "height": hw[0], "width": hw[1]}]
        with torch.no_grad():
            tensor = model.preprocess_image(inputs).tensor
        return {"model": lambda: model(inputs), "backbone": lambda: model.backbone(tensor)}

    def evaluate(self, dense, fact):
        ds = self.cfg.DATASETS.TEST[0]
        ap_d, metric, desc = evaluate_detector(self.cfg, dense, ds)
        ap_f, _, _ = evaluate_detector(self.cfg, fact, ds)
        chance, how = chance_detector(self.cfg, ds)
        return {"metric": metric, "dataset": ds, "evaluator": desc, "dense": ap_d, "factorized": ap_f,
                "chance": chance, "chance_method": how, "dataset_root": MetadataCatalog.get(ds).get("dirname", None)}

    def initial_model(self, initial, dense, notes):
        cfg = self.cfg
        if initial:
            return load_model(cfg, initial, dense_only=True)[0], f"checkpoint `{initial}`", None
        # detectron2's default_setup seeds with cfg.SEED and the trainer builds the model right after.
        seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
        model = build_model(cfg)
        frozen = [n + ".weight" for n, m in dense.named_modules() if isinstance(m, nn.Conv2d) and not m.weight.requires_grad]
        same = initial_weights_match(model.state_dict(), dense.state_dict(), frozen)
        if same is not None:
            notes.append(f"initial weights for the spectra: rebuilt with SEED={cfg.SEED}; they "
                         + ("equal" if same else "do NOT equal")
                         + f" the trained checkpoint on its {len(frozen)} frozen convs (which training never changes)")
        return model, f"the model rebuilt from the config with SEED={cfg.SEED} (the trainer's initialisation)", same


def measure(cfg: CfgNode, checkpoint: str, compressed: str, **options: Any) -> Dict[str, Any]:
    """Measure the projected dense ``checkpoint`` and the factorised ``compressed`` checkpoint.

    Args:
        cfg: the training config (with ``cfg.LRPET``; ``MODEL.WEIGHTS`` is ignored).
        checkpoint: the trained, projected dense checkpoint (e.g. ``model_final.pth``).
        compressed: its compressed checkpoint from ``tools/compress_det.py``.
        **options: of :func:`lrpet_dense.report.measure_run` (``run_dir``: the training output folder
            holding ``metrics.json``; ``initial``: a checkpoint of the weights before training, else
            the model rebuilt from the config with ``cfg.SEED``; ``input_hw``: default
            ``INPUT.MIN_SIZE_TEST`` square; ``evaluate``: on ``cfg.DATASETS.TEST[0]``; latency options).

    Returns:
        The report data (see :func:`lrpet_dense.report.write_report`).
    """
    return measure_run(_Detectron2Run(cfg), checkpoint, compressed, **options)
