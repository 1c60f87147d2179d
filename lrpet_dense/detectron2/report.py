"""Measure a trained LRPET detectron2 model and its compressed checkpoint for the report.

Everything is measured with detectron2's own machinery: models are built by ``build_model`` and
load strictly (:func:`~lrpet_dense.detectron2.deploy.load_model`; the compressed one into its
factorised structure, whatever the meta architecture), params and MACs by
``FlopCountAnalysis`` (:func:`~lrpet_dense.detectron2.count_flops_params`), accuracy by
``inference_on_dataset`` with ``PascalVOCDetectionEvaluator`` (AP50) or ``COCOEvaluator`` (AP).
:func:`measure_detectron2` returns the plain dict that :func:`lrpet_dense.report.write_report` writes.

Example:
    >>> data = measure_detectron2(cfg, "output/model_final.pth", "output/model_compressed.pth")  # doctest: +SKIP
    >>> write_report(data, "output/report")  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
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

from lrpet_dense.report import (check_same_plan, factorized_layer_names, history_section, initial_weights_match,
                                latency_section, measure_latency, spectra_section)

from .deploy import count_flops_params, load_model, plan_from_checkpoint

__all__ = ["evaluate_detector", "chance_detector", "measure_detectron2"]

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


def _complexity(model: nn.Module, hw: Tuple[int, int]) -> Dict[str, Dict[str, int]]:
    c = count_flops_params(model, hw)
    return {part: {"params": c["params"][part], "macs": c["flops"][part]} for part in ("backbone", "model")}


def _latency(model: nn.Module, hw: Tuple[int, int], repeats: int, warmup: int, threads: Optional[int]) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, *hw, generator=g) * 255).to(model.device)
    inputs = [{"image": image, "height": hw[0], "width": hw[1]}]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tensor = model.preprocess_image(inputs).tensor
        return {"model": measure_latency(lambda: model(inputs), repeats, warmup, threads),
                "backbone": measure_latency(lambda: model.backbone(tensor), repeats, warmup, threads)}
    finally:
        model.train(was_training)


def _initial_model(cfg: CfgNode, initial: Optional[str]) -> Tuple[nn.Module, str]:
    if initial:
        return load_model(cfg, initial, dense_only=True)[0], f"checkpoint `{initial}`"
    # detectron2's default_setup seeds with cfg.SEED and the trainer builds the model right after.
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    model = build_model(cfg)
    return model, f"the model rebuilt from the config with SEED={cfg.SEED} (the trainer's initialisation)"


def measure_detectron2(
    cfg: CfgNode,
    checkpoint: str,
    compressed: str,
    *,
    run_dir: Optional[str] = None,
    initial: Optional[str] = None,
    input_hw: Optional[Tuple[int, int]] = None,
    evaluate: bool = True,
    latency_repeats: int = 10,
    latency_warmup: int = 2,
    threads: Optional[int] = None,
    num_spectra: int = 4,
    title: Optional[str] = None,
) -> Dict[str, Any]:
    """Measure the projected dense ``checkpoint`` and the factorised ``compressed`` checkpoint.

    Args:
        cfg: the training config (with ``cfg.LRPET``; ``MODEL.WEIGHTS`` is ignored).
        checkpoint: the trained, projected dense checkpoint (e.g. ``model_final.pth``).
        compressed: its compressed checkpoint from ``tools/compress_det.py``.
        run_dir: training output folder holding ``metrics.json``. Defaults to the checkpoint's folder.
        initial: a checkpoint of the weights before training, for the spectra. Defaults to None:
            the model rebuilt from the config with ``cfg.SEED``.
        input_hw: input size for MACs and latency. Defaults to ``INPUT.MIN_SIZE_TEST`` square.
        evaluate: run the evaluator on ``cfg.DATASETS.TEST[0]``. Defaults to True.
        latency_repeats: timed runs per latency (median reported). Defaults to 10.
        latency_warmup: untimed runs first. Defaults to 2.
        threads: torch CPU threads for the latency. Defaults to None (torch's current setting).
        num_spectra: layers shown in the spectra figure. Defaults to 4.
        title: report title. Defaults to e.g. ``"Faster R-CNN R50-C4 (detectron2)"``.

    Returns:
        The report data (see :func:`lrpet_dense.report.write_report`).

    Raises:
        ValueError: a checkpoint carries no LRPET plan, or the two plans differ.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    hw = tuple(int(s) for s in input_hw) if input_hw else (int(cfg.INPUT.MIN_SIZE_TEST),) * 2
    run_dir = run_dir or os.path.dirname(os.path.abspath(checkpoint))

    dense, ckpt = load_model(cfg, checkpoint, dense_only=True)
    fact, cckpt = load_model(cfg, compressed)
    plan, cplan = plan_from_checkpoint(ckpt), plan_from_checkpoint(cckpt)
    check_same_plan(plan, cplan, checkpoint, compressed)
    factorized = factorized_layer_names(fact, compressed)
    dense.eval()
    fact.eval()

    data: Dict[str, Any] = {
        "framework": "detectron2",
        "title": title or (f"Faster R-CNN R{cfg.MODEL.RESNETS.DEPTH}-"
                           f"{'C4' if cfg.MODEL.ROI_HEADS.NAME == 'Res5ROIHeads' else 'FPN'} (detectron2)"),
        "config": getattr(cfg, "_lrpet_config_file", None),
        "checkpoint": checkpoint, "compressed_checkpoint": compressed, "run_dir": run_dir,
        "input_size": list(hw),
        "counter": "detectron2 `FlopCountAnalysis` (fvcore; one multiply-accumulate counted as one flop)",
        "plan": plan.to_dict(),
        "factorized_layers": factorized,
        "complexity": {"dense": _complexity(dense, hw), "factorized": _complexity(fact, hw)},
        "notes": [],
    }
    logger.info("report: measuring CPU latency (%d runs each)", latency_repeats)
    data["latency"] = latency_section(lambda m: _latency(m, hw, latency_repeats, latency_warmup, threads),
                                      dense, fact, latency_repeats, latency_warmup)

    if evaluate:
        ds = cfg.DATASETS.TEST[0]
        logger.info("report: evaluating the dense and the factorised model on %s", ds)
        ap_d, metric, desc = evaluate_detector(cfg, dense, ds)
        ap_f, _, _ = evaluate_detector(cfg, fact, ds)
        chance, how = chance_detector(cfg, ds)
        data["accuracy"] = {"metric": metric, "dataset": ds, "evaluator": desc, "dense": ap_d, "factorized": ap_f,
                            "chance": chance, "chance_method": how}

    data["history"] = history_section(run_dir, data["notes"])

    init_model, source = _initial_model(cfg, initial)
    data["spectra"] = spectra_section(plan, init_model, dense, source, num_spectra)
    frozen = [n + ".weight" for n, m in dense.named_modules()
              if isinstance(m, nn.Conv2d) and not m.weight.requires_grad]
    same = None if initial else initial_weights_match(init_model.state_dict(), dense.state_dict(), frozen)
    if same is not None:
        data["spectra"]["initial_verified"] = same
        data["notes"].append(
            f"initial weights for the spectra: rebuilt with SEED={cfg.SEED}; they "
            + ("equal" if same else "do NOT equal")
            + f" the trained checkpoint on its {len(frozen)} frozen convs (which training never changes)")
    return data
