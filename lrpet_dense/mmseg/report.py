"""Measure a trained LRPET mmseg model and its compressed checkpoint for the report.

Everything is measured with mmseg's and mmengine's own machinery: models are built as
``mmseg.apis.init_model`` builds them and load strictly (:func:`~lrpet_dense.mmseg.load_model`; the
compressed one into its factorised structure, whatever the model type), params and
MACs by ``mmengine.analysis.get_model_complexity_info`` (:func:`~lrpet_dense.mmseg.complexity`),
accuracy by the config's ``test_dataloader`` and ``test_evaluator`` (``IoUMetric``: mIoU) run as
mmengine's ``TestLoop`` runs them. :func:`measure_mmseg` returns the plain dict that
:func:`lrpet_dense.report.write_report` writes.

Example:
    >>> data = measure_mmseg(cfg, "work_dirs/x/iter_100.pth", "work_dirs/x/compressed.pth")  # doctest: +SKIP
    >>> write_report(data, "work_dirs/x/report")  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.evaluator import Evaluator
from mmengine.runner import Runner, set_random_seed
from mmengine.structures import PixelData
from torch import nn

from lrpet_dense.report import (check_same_plan, factorized_layer_names, history_section, latency_section,
                                measure_latency, spectra_section)

from .deploy import complexity, load_model, plan_from_checkpoint

__all__ = ["evaluate_segmentor", "chance_segmentor", "measure_mmseg"]

logger = logging.getLogger(__name__)

# decode head type -> the model's usual name, for report titles
_SEGMENTOR_NAMES = {"PSPHead": "PSPNet", "ASPPHead": "DeepLabV3", "DepthwiseSeparableASPPHead": "DeepLabV3+",
                    "FCNHead": "FCN", "UPerHead": "UPerNet"}


def _run_test_loop(cfg: Config, predict: Callable[[dict], list]) -> Dict[str, float]:
    """What mmengine's ``TestLoop`` does, with ``predict(data_batch) -> data samples`` as the model."""
    loader = Runner.build_dataloader(copy.deepcopy(cfg.test_dataloader))
    evaluator = Evaluator(copy.deepcopy(cfg.test_evaluator))
    evaluator.dataset_meta = loader.dataset.metainfo
    with torch.no_grad():
        for data in loader:
            evaluator.process(data_samples=predict(data), data_batch=data)
    return evaluator.evaluate(len(loader.dataset))


def evaluate_segmentor(cfg: Config, model: nn.Module) -> Dict[str, float]:
    """The config's ``test_evaluator`` metrics (e.g. ``mIoU``) of ``model`` on its ``test_dataloader``."""
    model.eval()
    return _run_test_loop(cfg, model.test_step)


def chance_segmentor(cfg: Config, label: int = 0) -> Dict[str, float]:
    """The metrics of a constant prediction (every pixel ``label``; 0 = background): the chance level."""
    def constant(data: dict) -> list:
        samples = data["data_samples"]
        for s in samples:
            s.pred_sem_seg = PixelData(data=torch.full_like(s.gt_sem_seg.data, label))
        return samples

    return _run_test_loop(cfg, constant)


def _latency(model: nn.Module, hw: Tuple[int, int], repeats: int, warmup: int, threads: Optional[int]) -> Dict[str, Any]:
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    model.eval()
    return {"model": measure_latency(lambda: model(x, mode="tensor"), repeats, warmup, threads),
            "backbone": measure_latency(lambda: model.backbone(x), repeats, warmup, threads)}


def measure_mmseg(
    cfg: Config,
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
        cfg: the training config (model type ``LRPETEncoderDecoder``).
        checkpoint: the trained, projected checkpoint (e.g. ``iter_20000.pth``).
        compressed: its compressed checkpoint from ``tools/compress_seg.py``.
        run_dir: the training ``work_dir`` (``*/vis_data/scalars.json``). Defaults to the
            checkpoint's folder.
        initial: a checkpoint of the weights before training, for the spectra. Defaults to None:
            the model freshly built and initialised from the config with its ``randomness.seed``.
        input_hw: input size for MACs and latency. Defaults to ``data_preprocessor.size``.
        evaluate: run the test evaluator. Defaults to True.
        latency_repeats: timed runs per latency (median reported). Defaults to 10.
        latency_warmup: untimed runs first. Defaults to 2.
        threads: torch CPU threads for the latency. Defaults to None (torch's current setting).
        num_spectra: layers shown in the spectra figure. Defaults to 4.
        title: report title. Defaults to one built from the decode head and backbone types.

    Returns:
        The report data (see :func:`lrpet_dense.report.write_report`).

    Raises:
        ValueError: a checkpoint carries no LRPET plan, or the two plans differ.
    """
    from mmseg.registry import MODELS

    run_dir = run_dir or os.path.dirname(os.path.abspath(checkpoint))
    dense, ckpt = load_model(cfg, checkpoint, dense_only=True)
    fact, cckpt = load_model(cfg, compressed)
    plan, cplan = plan_from_checkpoint(ckpt), plan_from_checkpoint(cckpt)
    check_same_plan(plan, cplan, checkpoint, compressed)
    factorized = factorized_layer_names(fact, compressed)
    dense.eval()
    fact.eval()
    size = getattr(dense.data_preprocessor, "size", None) or (512, 512)
    hw = tuple(int(s) for s in (input_hw or size))
    bb, head = cfg.model.backbone, cfg.model.decode_head
    data: Dict[str, Any] = {
        "framework": "mmseg",
        "title": title or (f"{_SEGMENTOR_NAMES.get(head.type, head.type)} {bb.type}-{bb.get('depth', '')} "
                           "(mmsegmentation)"),
        "config": getattr(cfg, "filename", None),
        "checkpoint": checkpoint, "compressed_checkpoint": compressed, "run_dir": run_dir,
        "input_size": list(hw),
        "counter": "`mmengine.analysis.get_model_complexity_info` (MACs of one inference: backbone + decode "
                   "head; params of all modules, auxiliary head included)",
        "plan": plan.to_dict(),
        "factorized_layers": factorized,
        "complexity": {"dense": complexity(dense, hw), "factorized": complexity(fact, hw)},
        "notes": [],
    }
    logger.info("report: measuring CPU latency (%d runs each)", latency_repeats)
    data["latency"] = latency_section(lambda m: _latency(m, hw, latency_repeats, latency_warmup, threads),
                                      dense, fact, latency_repeats, latency_warmup)

    if evaluate:
        logger.info("report: evaluating the dense and the factorised model")
        m_d, m_f, m_c = evaluate_segmentor(cfg, dense), evaluate_segmentor(cfg, fact), chance_segmentor(cfg)
        evaluator = cfg.test_evaluator
        metric = "mIoU" if "mIoU" in m_d else sorted(m_d)[0]
        data["accuracy"] = {
            "metric": metric, "dataset": f"{cfg.test_dataloader.dataset.type} "
                                        f"{cfg.test_dataloader.dataset.get('ann_file', '')}".strip(),
            "evaluator": f"mmseg {evaluator.get('type', evaluator) if isinstance(evaluator, dict) else evaluator}",
            "dense": float(m_d[metric]), "factorized": float(m_f[metric]), "chance": float(m_c[metric]),
            "chance_method": "every pixel predicted background (the most frequent class)"}

    data["history"] = history_section(run_dir, data["notes"])

    if initial:
        init_model_ = load_model(cfg, initial, dense_only=True)[0]
        source = f"checkpoint `{initial}`"
    else:
        seed = (cfg.get("randomness") or {}).get("seed")
        if seed is not None:
            set_random_seed(seed)
        mcfg = copy.deepcopy(cfg.model)
        mcfg.pretrained = None
        init_model_ = MODELS.build(mcfg)
        init_model_.init_weights()
        source = (f"a model freshly built and initialised from the config (seed {seed}); the same "
                  "initialisation scheme as the trained one, not necessarily the same draw")
    data["spectra"] = spectra_section(plan, init_model_, dense, source, num_spectra)
    return data
