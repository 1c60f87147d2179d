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

from conftest import D2_TINY, D2_TOY_CFG, SEG_TOY_CFG, module_temp, run_tool
from lrpet_dense.core import LRPETConfig, RankPlan, build_rank_plan
from lrpet_dense.core.rank import LayerSpec
from lrpet_dense.report import (MAX_QUARTILE_RATIO, RunMeasurer, SpeedUp, judge_speedup, load_projection_history, measure_latency_pair,
                                measure_run, render_markdown, spectra_layers, time_interleaved, write_report,
                                write_summary)

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
    lat = {"median_ms": 2.0, "min_ms": 1.9, "max_ms": 2.2, "times_ms": [1.9, 2.0, 2.2]}
    fast = {"median_ms": 1.0, "min_ms": 0.9, "max_ms": 1.1, "times_ms": [0.9, 1.0, 1.1]}
    judged = {part: judge_speedup(lat["times_ms"], fast["times_ms"], ratio).to_dict()
              for part, ratio in (("backbone", 2.0), ("model", 9 / 7))}
    return {
        "framework": "mmseg", "title": "synthetic",
        "complexity": {"dense": {"backbone": {"params": 1000, "macs": 4_000_000},
                                 "model": {"params": 3000, "macs": 9_000_000}},
                       "factorized": {"backbone": {"params": 600, "macs": 2_000_000},
                                      "model": {"params": 2600, "macs": 7_000_000}}},
        "plan": plan.to_dict(), "factorized_layers": list(plan.layers)[:3], "input_size": [32, 32],
        "accuracy": {"metric": "mIoU", "dense": 55.5, "factorized": 55.25, "chance": 20.0, "chance_method": "const"},
        "latency": {"threads": 1, "rounds": 3, "warmup": 3, "form": "the deploy form", "load_average": [[0.1, 0, 0]],
                    "dense": {"model": lat, "backbone": lat}, "factorized": {"model": fast, "backbone": fast},
                    "speedup": judged},
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
    # backbone: 2.00x for a MACs ratio of 2.00x, a result; whole model: 2.00x for 1.29x, noise
    assert "| backbone | 2.0 (1.9-2.2) | 1.0 (0.9-1.1) | 2.00x (rounds 2.00-2.11x) | 2.00x |" in md
    assert ("| whole model | 2.0 (1.9-2.2) | 1.0 (0.9-1.1) | too noisy (rounds 2.00-2.11x; MACs ratio 1.29x) "
            "| 1.29x |") in md
    assert "**The timing was too noisy**" in md and "whole model: every one of the 3 rounds" in md
    assert "in the deploy form" in md and "load average (1 min) 0.10" in md
    for name, lp in RankPlan.from_dict(data["plan"]).layers.items():
        assert f"| `{name}` | 64x32x3x3 | {lp.rank} / 64 |" in md
    summary = write_summary([str(tmp_path / "rep")], str(tmp_path / "summary.md"))
    assert "mIoU 55.50 / 55.25 (20.00) |" in summary
    assert "| 50.0% | 22.2% | 13.3% | too noisy (rounds 2.00-2.11x; MACs ratio 1.29x) |" in summary


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


# -- timing and the noise rule ----------------------------------------------------------------------
class FakeClock:
    """A deterministic clock that only the stand-in models move: time is work done."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class StandIn(torch.nn.Module):
    """A stand-in model whose call costs ``work`` seconds on the fake clock, plus ``extra(i)`` on call ``i``
    (background load hitting that call); it records its calls in ``log``."""

    def __init__(self, name, work, clock, log, extra=lambda i: 0.0):
        super().__init__()
        self.name, self.work, self.clock, self.log, self.extra = name, work, clock, log, extra
        self.calls = 0

    def forward(self):
        assert torch.is_inference_mode_enabled()
        self.clock.now += self.work + self.extra(self.calls)
        self.calls += 1
        self.log.append(self.name)


def _pair(dense_work, fact_work, dense_extra=lambda i: 0.0, fact_extra=lambda i: 0.0):
    clock, log = FakeClock(), []
    fns = {"dense": StandIn("dense", dense_work, clock, log, dense_extra),
           "factorized": StandIn("factorized", fact_work, clock, log, fact_extra)}
    return fns, clock, log


def test_time_interleaved_rounds_and_warmup():
    fns, clock, log = _pair(0.010, 0.004)
    t = time_interleaved(fns, rounds=4, warmup=3, threads=1, clock=clock, cpu_clock=clock)
    # 3 warm-up calls each, then 4 rounds, the order reversed every other round
    assert log == ["dense", "factorized"] * 3 + ["dense", "factorized", "factorized", "dense"] * 2
    assert t["dense"].wall_ms == pytest.approx([10.0] * 4) and t["factorized"].wall_ms == pytest.approx([4.0] * 4)
    assert t["dense"].cpu_ms == pytest.approx([10.0] * 4)
    d = t["dense"].to_dict()
    assert [d["min_ms"], d["median_ms"], d["max_ms"], d["cpu_median_ms"]] == pytest.approx([10.0] * 4)
    assert d["times_ms"] == list(t["dense"].wall_ms)
    for bad, match in (({}, "at least one"), (dict(rounds=0), "rounds"), (dict(warmup=-1), "warmup"),
                       (dict(threads=0), "threads"), (dict(rounds=True), "rounds")):
        with pytest.raises(ValueError, match=match):
            time_interleaved({} if bad == {} else fns, **(bad or {}))


def test_noise_rule_refuses_a_speedup_above_the_macs_ratio():
    # the stand-in pair's real work differs by 2.5x: a result for a MACs ratio of 3, noise for one of 2
    fns, clock, _ = _pair(0.010, 0.004)
    t = time_interleaved(fns, rounds=5, warmup=1, clock=clock, cpu_clock=clock)
    ok = judge_speedup(t["dense"], t["factorized"], macs_ratio=3.0)
    assert not ok.noisy and ok.reason == "" and ok.value == pytest.approx(2.5)
    assert ok.text() == "2.50x (rounds 2.50-2.50x)"
    bad = judge_speedup(t["dense"], t["factorized"], macs_ratio=2.0)
    assert bad.noisy and "every one of the 5 rounds" in bad.reason
    assert bad.text() == "too noisy (rounds 2.50-2.50x; MACs ratio 2.00x)" and "2.50x (" not in bad.text()
    # background load in some rounds: the factorised model's calls 1 and 3 (rounds 0 and 2) slowed
    # down, the dense model's calls 2 and 4 (rounds 1 and 3) too: per-round speed-ups 1.25, 5, 1.25,
    # 5, 2.5; the median 2.5 is above a MACs ratio of 2.4 while the smallest round is below it
    fns, clock, _ = _pair(0.010, 0.004, dense_extra=lambda i: 0.010 if i in (2, 4) else 0.0,
                          fact_extra=lambda i: 0.004 if i in (1, 3) else 0.0)
    t = time_interleaved(fns, rounds=5, warmup=1, clock=clock, cpu_clock=clock)
    s = judge_speedup(t["dense"], t["factorized"], macs_ratio=2.4)
    assert [round(d / f, 3) for d, f in zip(t["dense"].wall_ms, t["factorized"].wall_ms)] == [1.25, 5.0, 1.25, 5.0, 2.5]
    assert s.noisy and (s.low, s.value, s.high) == pytest.approx((1.25, 2.5, 5.0)) and "median speed-up 2.50x" in s.reason
    # the same rounds against a MACs ratio above the median: still noise, the rounds disagree by 4x
    s = judge_speedup(t["dense"], t["factorized"], macs_ratio=3.0)
    assert s.noisy and (s.q1, s.q3) == pytest.approx((1.25, 5.0)) and "the rounds disagree" in s.reason
    # one disturbed round (the dense model's call 3: round 3) leaves the quartiles together: a result
    fns, clock, _ = _pair(0.010, 0.004, dense_extra=lambda i: 0.010 if i == 3 else 0.0)
    t = time_interleaved(fns, rounds=5, warmup=1, clock=clock, cpu_clock=clock)
    s = judge_speedup(t["dense"], t["factorized"], macs_ratio=3.0)
    assert not s.noisy and s.text() == "2.50x (rounds 2.50-5.00x)" and s.q3 == pytest.approx(2.5)
    # with fewer than 4 rounds there are no quartiles to compare: rule 1 only
    assert not judge_speedup([10.0, 20.0, 40.0], [4.0, 4.0, 4.0], macs_ratio=6.0).noisy
    # a factorised model slower than the dense one is a result too
    assert not judge_speedup([1.0, 1.0], [2.0, 2.0], 1.5).noisy
    assert SpeedUp.from_dict(s.to_dict()) == s


def test_judge_speedup_bad_input():
    for args, match in ((([], [], 2.0), "same rounds"), (([1.0], [1.0, 2.0], 2.0), "same rounds"),
                        (([1.0], [0.0], 2.0), "factorised times must be positive"),
                        (([float("nan")], [1.0], 2.0), "dense times"), (([1.0], [1.0], 0.0), "macs_ratio"),
                        (([1.0], [1.0], float("inf")), "macs_ratio")):
        with pytest.raises(ValueError, match=match):
            judge_speedup(*args)
    with pytest.raises(ValueError, match="missing 'noisy'"):
        SpeedUp.from_dict({"value": 1, "low": 1, "high": 1, "q1": 1, "q3": 1, "macs_ratio": 1, "rounds": 1})


def test_measure_latency_pair_judges_each_part():
    clock, log = FakeClock(), []
    dense = {"backbone": StandIn("db", 0.010, clock, log), "model": StandIn("dm", 0.030, clock, log)}
    fact = {"backbone": StandIn("fb", 0.005, clock, log), "model": StandIn("fm", 0.020, clock, log)}
    from unittest import mock

    with mock.patch("time.perf_counter", clock), mock.patch("time.process_time", clock):
        lat = measure_latency_pair(dense, fact, {"backbone": 2.5, "model": 1.2}, rounds=3, warmup=2)
    assert lat["rounds"] == 3 and lat["warmup"] == 2 and len(lat["load_average"]) == 2
    assert lat["speedup"]["backbone"]["value"] == pytest.approx(2.0) and not lat["speedup"]["backbone"]["noisy"]
    assert lat["speedup"]["model"]["value"] == pytest.approx(1.5) and lat["speedup"]["model"]["noisy"]
    assert lat["dense"]["model"]["median_ms"] == pytest.approx(30.0)
    # each part on its own rounds: the backbones' calls all come before the whole models'
    assert log[:10] == ["db", "fb"] * 2 + ["db", "fb", "fb", "db", "db", "fb"]
    with pytest.raises(ValueError, match="same parts"):
        measure_latency_pair(dense, fact, {"backbone": 2.5})


class _TinyRun(RunMeasurer):
    """A framework-free stand-in adapter: a two-conv "backbone" and a head, dense and factorised."""

    framework, counter = "tiny", "conv MACs"
    events: list = []

    @staticmethod
    def _build(factorised: bool):
        from lrpet_dense.core import FactorizedConv2d

        torch.manual_seed(0)
        model = torch.nn.Module()
        model.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16).eval(),
                                             torch.nn.Conv2d(16, 16, 3, padding=1))
        model.head = torch.nn.Conv2d(16, 2, 1)
        if factorised:
            model.backbone[2] = FactorizedConv2d.empty_like(model.backbone[2], 8)
        return model.eval()

    @classmethod
    def load_model(cls, cfg, path, dense_only):
        plan = build_rank_plan([LayerSpec("backbone.2", (16, 16, 3, 3), (8, 8))], LRPETConfig(ratio=0.5))
        return cls._build(not dense_only), {"plan": plan, "path": path}

    plan_from_checkpoint = staticmethod(lambda ckpt: ckpt["plan"])

    @classmethod
    def to_inference(cls, model, check_hw):
        assert check_hw == (8, 8)  # the input size, smaller than the default check size
        cls.events.append(("deploy", model))
        model.deployed = True
        return model

    def title(self):
        return "tiny"

    def input_hw(self, model):
        return (8, 8)

    def complexity(self, model, hw):
        from lrpet_dense.core import FactorizedConv2d

        bb = 16 * 3 * 9 * 64 + (8 * (16 * 9 + 16) * 64 if isinstance(model.backbone[2], FactorizedConv2d)
                                else 16 * 16 * 9 * 64)
        return {"backbone": {"params": 1, "macs": bb}, "model": {"params": 1, "macs": bb + 32 * 64}}

    def forwards(self, model, hw):
        x = torch.randn(1, 3, *hw)
        self.events.append(("forwards", model))
        return {"backbone": lambda: model.backbone(x), "model": lambda: model.head(model.backbone(x))}

    def evaluate(self, dense, fact):
        self.events.append(("evaluate", dense, fact))
        return {"metric": "acc", "dataset": "toy", "dense": 50.0, "factorized": 50.0, "chance": 10.0,
                "chance_method": "constant", "dataset_root": self.cfg}

    def initial_model(self, initial, dense, notes):
        return self._build(False), "fresh", None


def test_measure_run_times_deploy_copies_and_marks_the_toy_set(tmp_path):
    from lrpet_dense.data.toy_voc import MARKER, generated_dataset, make_toy_voc

    devkit = make_toy_voc(str(tmp_path / "toy"), num_train=1, num_test=2, size=32)
    marker = generated_dataset(os.path.join(devkit, "VOC2007"))
    assert marker == {"generated_by": "lrpet_dense", "kind": "toy", "train": 1, "test": 2, "size": 32, "seed": 0}
    assert generated_dataset(str(tmp_path)) is None and generated_dataset(None) is None
    _TinyRun.events = []
    data = measure_run(_TinyRun(os.path.join(devkit, "VOC2012")), "dense.pth", "fact.pth", run_dir=str(tmp_path),
                       latency_repeats=2, latency_warmup=1, threads=1)
    deployed = [e[1] for e in _TinyRun.events if e[0] == "deploy"]
    timed = [e[1] for e in _TinyRun.events if e[0] == "forwards"]
    (_, dense, fact), = [e for e in _TinyRun.events if e[0] == "evaluate"]
    # the latency is timed on deployed copies; accuracy on the models as loaded, left as they were
    assert timed == deployed and len(deployed) == 2 and all(getattr(m, "deployed", False) for m in timed)
    assert not hasattr(dense, "deployed") and not hasattr(fact, "deployed") and not {id(dense), id(fact)} & {
        id(m) for m in timed}
    lat, comp = data["latency"], data["complexity"]
    assert "to_inference_" in lat["form"] and lat["rounds"] == 2 and lat["warmup"] == 1 and lat["threads"] == 1
    for part in ("backbone", "model"):
        s = SpeedUp.from_dict(lat["speedup"][part])
        assert s.macs_ratio == comp["dense"][part]["macs"] / comp["factorized"][part]["macs"] and s.rounds == 2
        assert s.noisy == (s.value > s.macs_ratio) and len(lat["dense"][part]["times_ms"]) == 2  # < 4 rounds
    # the toy set's accuracy is labelled a smoke check, in the data, the report and the summary
    acc = data["accuracy"]
    assert "dataset_root" not in acc and "smoke check" in acc["smoke_check"] and "2 test images of 32 px" in \
        acc["smoke_check"]
    write_report(data, str(tmp_path / "rep"))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"The acc above is {acc['smoke_check']}." in md
    assert "toy-set smoke check" in write_summary([str(tmp_path / "rep")], str(tmp_path / "s.md"))
    for bad in (dict(latency_repeats=0), dict(latency_warmup=-1)):
        _TinyRun.events = []
        with pytest.raises(ValueError, match="latency_"):
            measure_run(_TinyRun(None), "dense.pth", "fact.pth", **bad)
        assert _TinyRun.events == []  # refused before anything ran
    # another dataset: no such note
    os.remove(os.path.join(devkit, MARKER))
    data = measure_run(_TinyRun(os.path.join(devkit, "VOC2012")), "dense.pth", "fact.pth", run_dir=str(tmp_path),
                       latency_repeats=1, latency_warmup=0)
    assert "smoke_check" not in data["accuracy"] and "smoke check" not in render_markdown(data)


def test_spectra_layers_spread():
    names = [str(i) for i in range(10)]
    assert spectra_layers(names, 4) == ["0", "3", "6", "9"]
    assert spectra_layers(names[:3], 4) == names[:3]


# -- detectron2 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def d2_report(d2_run, d2_toy_voc, request):
    pytest.importorskip("detectron2")
    out, _ = d2_run
    work = module_temp(request, "d2_report")
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
    _check_latency(data)
    assert "smoke check" in acc["smoke_check"]  # the toy set


def _check_latency(data):
    """Timed in the deploy form, every part's speed-up judged against that part's MACs ratio."""
    lat, comp = data["latency"], data["complexity"]
    assert lat["threads"] == 1 and "to_inference_" in lat["form"] and set(lat["speedup"]) == {"backbone", "model"}
    for part, judged in lat["speedup"].items():
        assert judged["macs_ratio"] == comp["dense"][part]["macs"] / comp["factorized"][part]["macs"]
        assert judged["noisy"] == (judged["value"] > judged["macs_ratio"] or (
            judged["rounds"] >= 4 and judged["q3"] > MAX_QUARTILE_RATIO * judged["q1"]))
        assert lat["dense"][part]["median_ms"] > 0


# -- mmseg ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_report(seg_run, seg_toy_data, request):
    pytest.importorskip("mmseg")
    work = module_temp(request, "seg_report")
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
    assert "smoke check" in acc["smoke_check"]  # the toy set
    _check_latency(data)
