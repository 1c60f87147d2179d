"""Tests of the LRPET report (``lrpet_dense.report`` + ``tools/report.py``) for both frameworks.

The framework tests reuse the session's tiny training runs (``conftest.d2_run``, ``conftest.seg_run``),
compress them with the real tools, write the report with ``tools/report.py``, and check that its
numbers are the measured ones: the plan is the checkpoints' plan, params/MACs recomputed with the
frameworks' counters on the compressed checkpoint equal report.json, the projection history equals
the values in metrics.json / scalars.json, and the dense accuracy equals the training run's own
final evaluation.
"""
from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from conftest import D2_TINY, D2_TOY_CFG, SEG_TOY_CFG, run_tool
from lrpet_dense.core import LRPETConfig, RankPlan, build_rank_plan
from lrpet_dense.core.rank import LayerSpec
from lrpet_dense.report import (load_projection_history, measure_latency, render_markdown, spectra_layers,
                                write_report, write_summary)

pytestmark = pytest.mark.timeout(600)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=5000):
    """A complete PNG file (signature, IHDR with a non-trivial size, IEND) of at least ``min_bytes``."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert w >= 200 and h >= 150, (w, h)
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    assert len(data) >= min_bytes, f"{path}: {len(data)} bytes"


# -- the framework-free writer ---------------------------------------------------------------------
def _synthetic_data():
    specs = [LayerSpec(f"backbone.layer{i}.conv", (64, 32, 3, 3), (8, 8)) for i in range(5)]
    plan = build_rank_plan(specs, LRPETConfig(ratio=0.5))
    g = torch.Generator().manual_seed(0)
    spectra = {n: {"rank": plan[n].rank, "initial": sorted(torch.rand(64, generator=g).tolist(), reverse=True),
                   "final": sorted(torch.rand(64, generator=g).tolist(), reverse=True)[:plan[n].rank] + [0.0] * 32}
               for n in spectra_layers(list(plan.layers), 2)}
    lat = {"median_ms": 2.0, "min_ms": 1.9, "times_ms": [2.0], "repeats": 1, "warmup": 0, "threads": 1}
    return {
        "framework": "mmseg", "title": "synthetic",
        "complexity": {"dense": {"backbone": {"params": 1000, "macs": 4_000_000},
                                 "model": {"params": 3000, "macs": 9_000_000}},
                       "factorized": {"backbone": {"params": 600, "macs": 2_000_000},
                                      "model": {"params": 2600, "macs": 7_000_000}}},
        "plan": plan.to_dict(), "factorized_layers": list(plan.layers)[:3], "input_size": [32, 32],
        "accuracy": {"metric": "mIoU", "dense": 55.5, "factorized": 55.25, "chance": 20.0, "chance_method": "const"},
        "latency": {"threads": 1, "repeats": 1, "warmup": 0, "dense": {"model": lat, "backbone": lat},
                    "factorized": {"model": dict(lat, median_ms=1.0), "backbone": dict(lat, median_ms=1.0)}},
        "history": [{"step": 10, "energy_kept_mean": 0.8, "energy_kept_min": 0.7, "rel_change_mean": 0.4,
                     "rel_change_max": 0.5, "time_s": 0.1},
                    {"step": 20, "energy_kept_mean": 0.99, "energy_kept_min": 0.98, "rel_change_mean": 0.05,
                     "rel_change_max": 0.1, "time_s": 0.1}],
        "spectra": {"initial_source": "synthetic", "layers": spectra},
    }


def test_write_report_files_and_figures(tmp_path):
    data = _synthetic_data()
    paths = write_report(data, str(tmp_path / "rep"))
    assert set(paths) == {"markdown", "json", "ranks", "spectra", "history"}
    for kind in ("ranks", "spectra", "history"):
        assert_png(paths[kind])
    saved = json.loads(Path(paths["json"]).read_text())
    assert saved["complexity"] == data["complexity"] and saved["plan"] == data["plan"]
    assert saved["figures"] == {"ranks": "ranks.png", "spectra": "spectra.png", "history": "history.png"}
    md = Path(paths["markdown"]).read_text()
    assert md == render_markdown(data, saved["figures"])
    assert "| backbone | 1.000 k | 600 | 40.0% | 4.000 M | 2.000 M | 50.0% |" in md
    assert "| projected dense (trained) | 55.50 |" in md and "| factorised (compressed checkpoint) | 55.25 |" in md
    assert "| whole model | 2.0 | 1.0 | 2.00x | 1.29x |" in md
    for name, lp in RankPlan.from_dict(data["plan"]).layers.items():
        assert f"| `{name}` | 64x32x3x3 | {lp.rank} / 64 |" in md
    summary = write_summary([str(tmp_path / "rep")], str(tmp_path / "summary.md"))
    assert "mIoU 55.50 / 55.25 (20.00)" in summary and "| 50.0% | 22.2% | 13.3% | 2.00x |" in summary


def test_write_report_without_optional_parts(tmp_path):
    data = {k: v for k, v in _synthetic_data().items() if k in ("framework", "title", "complexity", "plan")}
    paths = write_report(data, str(tmp_path))
    assert set(paths) == {"markdown", "json", "ranks"}
    with pytest.raises(ValueError, match="lacks required key"):
        write_report({"title": "x"}, str(tmp_path))


def test_history_from_both_frameworks_logs(tmp_path):
    d2 = tmp_path / "d2"
    d2.mkdir()
    rows = [{"iteration": 4, "total_loss": 1.0},
            {"iteration": 9, "lrpet/energy_kept_mean": 0.9, "lrpet/energy_kept_min": 0.8, "lrpet/rel_change_mean": 0.3,
             "lrpet/rel_change_max": 0.4, "lrpet/time_s": 0.5}]
    (d2 / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_projection_history(str(d2)) == [{"step": 10, "energy_kept_mean": 0.9, "energy_kept_min": 0.8,
                                                 "rel_change_mean": 0.3, "rel_change_max": 0.4, "time_s": 0.5}]
    seg = tmp_path / "seg" / "20250101_000000" / "vis_data"
    seg.mkdir(parents=True)
    rows = [{"loss": 1.0, "step": 1}, {"lrpet/energy_kept_mean": 0.7, "lrpet/energy_kept_min": 0.6, "step": 2}]
    (seg / "scalars.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_projection_history(str(tmp_path / "seg")) == [{"step": 2, "energy_kept_mean": 0.7,
                                                               "energy_kept_min": 0.6}]
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        load_projection_history(str(tmp_path / "nothing"))


def test_measure_latency():
    calls = []
    r = measure_latency(lambda: calls.append(1), repeats=3, warmup=2, threads=1)
    assert len(calls) == 5 and r["repeats"] == 3 and len(r["times_ms"]) == 3 and r["threads"] == 1
    assert r["median_ms"] == sorted(r["times_ms"])[1]
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(lambda: None, repeats=0)


def test_spectra_layers_spread():
    names = [str(i) for i in range(10)]
    assert spectra_layers(names, 4) == ["0", "3", "6", "9"]
    assert spectra_layers(names[:3], 4) == names[:3]


# -- detectron2 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def d2_report(d2_run, d2_toy_voc, tmp_path_factory):
    pytest.importorskip("detectron2")
    out, _ = d2_run
    work = tmp_path_factory.mktemp("d2_report")
    compressed = work / "model_compressed.pth"
    env = {"LRPET_TOY_VOC": d2_toy_voc}
    run_tool(["-m", "lrpet_dense", "compress", "det", "--config", D2_TOY_CFG, "--checkpoint", out / "model_final.pth",
              "--output", compressed, "--no-flops", *D2_TINY], env, timeout=900)
    text = run_tool(["tools/report.py", "det", "--config", D2_TOY_CFG, "--checkpoint", out / "model_final.pth",
                     "--compressed", compressed, "--out", work / "report", "--repeats", "1", "--warmup", "0",
                     "--threads", "1", *D2_TINY], env, timeout=900)
    return out, compressed, work / "report", text


@pytest.mark.slow
def test_d2_report_files(d2_report):
    _, _, rep, text = d2_report
    assert (rep / "report.md").read_text() in text  # printed at the end
    for kind in ("ranks", "spectra", "history"):
        assert_png(rep / f"{kind}.png")


@pytest.mark.slow
def test_d2_report_numbers_are_measured(d2_report, d2_toy_voc):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from lrpet_dense.detectron2 import add_lrpet_config, count_complexity, plan_from_checkpoint

    out, compressed, rep, _ = d2_report
    data = json.loads((rep / "report.json").read_text())
    ckpt = torch.load(str(out / "model_final.pth"), map_location="cpu", weights_only=True)
    assert data["plan"] == plan_from_checkpoint(ckpt).to_dict()
    # params and MACs of the compressed checkpoint, recounted by FlopCountAnalysis
    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(D2_TOY_CFG))
    cfg.merge_from_list(list(D2_TINY) + ["MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(compressed))
    c = count_complexity(model, tuple(data["input_size"]))
    for part in ("backbone", "model"):
        assert data["complexity"]["factorized"][part] == c[part]
        assert data["complexity"]["factorized"][part]["macs"] < data["complexity"]["dense"][part]["macs"]
    # the projection history is what detectron2's JSONWriter wrote
    metrics = [json.loads(l) for l in (out / "metrics.json").read_text().splitlines() if l.strip()]
    logged = [m for m in metrics if "lrpet/energy_kept_mean" in m]
    assert logged and [h["step"] for h in data["history"]] == [m["iteration"] + 1 for m in logged]
    for h, m in zip(data["history"], logged):
        assert h["energy_kept_mean"] == m["lrpet/energy_kept_mean"] and h["rel_change_max"] == m["lrpet/rel_change_max"]
    # the dense AP50 is the training run's own final evaluation of the same weights: the same float32
    # computation on the same machine, so equal (not a tolerance fitted to one CPU)
    final = [m for m in metrics if "bbox/AP50" in m][-1]
    acc = data["accuracy"]
    assert acc["metric"] == "AP50" and acc["dense"] == pytest.approx(final["bbox/AP50"], abs=1e-6)
    # the factorised model's AP is a smoke check (post-NMS, float32): that it equals the dense model's
    # computation is tested in float64 before NMS (test_detectron2.test_compressed_loads_and_predicts_like_dense)
    assert 0 <= acc["factorized"] <= 100 and 0 <= acc["chance"] <= 100
    # spectra: the final ones have exactly the planned rank; the initial ones are the trainer's init
    for name, s in data["spectra"]["layers"].items():
        k = s["rank"]
        assert k == data["plan"]["layers"][[l["name"] for l in data["plan"]["layers"]].index(name)]["rank"]
        assert s["final"][k] < 1e-4 * s["final"][0] < s["final"][k - 1]
    assert data["spectra"]["initial_verified"] is True
    assert data["latency"]["threads"] == 1 and data["latency"]["dense"]["model"]["median_ms"] > 0


# -- mmseg ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_report(seg_run, seg_toy_data, tmp_path_factory):
    pytest.importorskip("mmseg")
    work = tmp_path_factory.mktemp("seg_report")
    compressed = work / "compressed.pth"
    env = {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)}
    run_tool(["-m", "lrpet_dense", "compress", "seg", SEG_TOY_CFG, seg_run / "iter_3.pth", compressed], env, timeout=900)
    text = run_tool(["tools/report.py", "seg", SEG_TOY_CFG, seg_run / "iter_3.pth", compressed,
                     "--out", work / "report", "--repeats", "1", "--warmup", "0", "--threads", "1"], env, timeout=900)
    return seg_run, compressed, work / "report", text


@pytest.mark.slow
def test_seg_report_files(seg_report):
    _, _, rep, text = seg_report
    assert (rep / "report.md").read_text() in text
    for kind in ("ranks", "spectra", "history"):
        assert_png(rep / f"{kind}.png")


@pytest.mark.slow
def test_seg_report_numbers_are_measured(seg_report, seg_toy_data):
    from unittest import mock

    from mmengine.config import Config
    from mmseg.apis import init_model

    from lrpet_dense.mmseg import count_complexity

    run, compressed, rep, _ = seg_report
    data = json.loads((rep / "report.json").read_text())
    ckpt = torch.load(str(run / "iter_3.pth"), map_location="cpu", weights_only=True)
    assert data["plan"] == ckpt["lrpet"]["plan"]
    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)}):
        cfg = Config.fromfile(str(SEG_TOY_CFG))
    model = init_model(copy.deepcopy(cfg), str(compressed), device="cpu")
    c = count_complexity(model, tuple(data["input_size"]))
    assert data["complexity"]["factorized"] == c
    scalars = [json.loads(l) for f in sorted(run.glob("*/vis_data/scalars.json")) for l in f.read_text().splitlines()
               if l.strip()]
    logged = [s for s in scalars if "lrpet/energy_kept_mean" in s]
    assert [h["step"] for h in data["history"]] == [s["step"] for s in logged] == [2, 3]
    for h, s in zip(data["history"], logged):
        assert h["energy_kept_min"] == s["lrpet/energy_kept_min"] and h["rel_change_mean"] == s["lrpet/rel_change_mean"]
    # the dense mIoU is the run's own validation of the same (last, projected) weights
    val = [s for s in scalars if "mIoU" in s][-1]
    acc = data["accuracy"]
    assert acc["metric"] == "mIoU" and acc["dense"] == pytest.approx(val["mIoU"], abs=1e-6)
    # smoke check (argmax of float32 logits); the logits themselves are compared in float64 in
    # test_mmseg.test_compressed_checkpoint_loads_with_init_model
    assert 0 <= acc["factorized"] <= 100 and 0 < acc["chance"] < 100
