"""The fidelity harness (``benchmarks/bench_fidelity.py``) and the LRPET-S bench on it (``bench_search.py``).

``--tiny`` runs every code path once through both frameworks' trainers and evaluators (no accuracy
threshold: a few iterations on a handful of images measure nothing but that the protocol runs end to
end and keeps its budgets). The statistics and the validity checks are tested on synthetic results:
each check must be able to fail.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_fidelity as bf  # noqa: E402
from conftest import module_temp  # noqa: E402


@pytest.fixture(scope="module")
def fidelity_tiny(request) -> Path:
    """One ``bench_fidelity.py --tiny`` run (its folder): checked below, and the job cache the search bench reuses."""
    out = module_temp(request, "fid")
    proc = subprocess.run([sys.executable, "benchmarks/bench_fidelity.py", "--tiny", "--workers", "2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1450)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fidelity_harness_tiny(fidelity_tiny):
    out = fidelity_tiny
    data = json.loads((out / "fidelity.json").read_text())
    assert (out / "fidelity.png").stat().st_size > 0
    md = (out / "fidelity.md").read_text()
    for title in ("dense learning curve", "equal total training", "compressing a trained dense model",
                  "## Validity checks", "## Goals"):
        assert title in md, title
    assert not data["missing"]
    b = bf.TINY
    rows = {(r["fw"], r["scenario"], r["method"], r["cut"], r["F"]): r for r in data["summary"]["rows"]}
    seg = {"lrpet", "lrpet-ramp", "lrpet-p5", "scratch", "svd-ft", "prune-ft", "lrpet-early"}
    det = {"lrpet", "scratch", "svd-ft"}
    for fw, methods in (("seg", seg), ("det", det)):
        T = bf.budget_iters(b, fw)
        got = {m for (f, sc, m, c, F) in rows if f == fw and sc == "equal" and c == 0.5}
        assert got == methods, (fw, got)
        for (f, sc, m, c, F), r in rows.items():
            assert r["n"] == 1 and all(isinstance(v, float) for v in r["values"]), r
            if f == fw and sc == "equal":  # the protocol's point: every row trained T iterations in all
                assert r["iters_total"] == T, (f, m, r["iters_total"])
        assert rows[(fw, "equal", "dense", None, None)]["macs_cut"] == pytest.approx(0.0, abs=1e-12)
        assert (fw, "oneshot", "svd", 0.5, None) in rows
        # every low-rank row at the cut has the one plan's MACs (the framework's counter), within 0.5 points
        lowrank = [r for (f, sc, m, c, F), r in rows.items() if f == fw and c == 0.5 and m != "prune-ft"]
        assert len({r["macs_cut"] for r in lowrank}) == 1 and abs(lowrank[0]["macs_cut"] - 0.5) <= 0.005
        assert [p["iters"] for p in data["summary"]["curves"][fw]] == sorted({bf.share_of(T, f) for f in
                                                                                (*getattr(b, f"{fw}_curve"), 1.0)} |
                                                                               ({T - bf.share_of(T, min(b.svd_ft))}
                                                                                if fw == "det" else set()))
    prune = rows[("seg", "equal", "prune-ft", 0.5, 2)]
    assert prune["macs_ok"] and prune["macs_cut"] >= 0.495  # at or below the LRPET model's MACs
    assert {m for (f, sc, m, c, F) in rows if sc == "finetune"} == {"ft-dense", "ft-svd", "ft-lrpet"}
    same = [c for c in data["summary"]["checks"] if "framework's own tool" in c["check"]]
    assert len(same) == 4 and all(c["ok"] for c in same), same  # dense and compressed, both frameworks
    assert set(data["summary"]["chance"]) == {"seg", "det"}
    assert data["cpu"] and data["date"] and "--tiny" in data["command"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_search_bench_tiny(fidelity_tiny, tmp_path):
    """``bench_search.py --tiny``: the fidelity rows through the fidelity job runner (the fidelity run's cache: its
    dense and lrpet jobs are reused, as a user's search after the fidelity bench reuses them), a two-trial search,
    the best plan trained like the ``lrpet`` row; its MACs within the budget (the single ratio's, counted)."""
    out, fout = tmp_path / "search", fidelity_tiny
    proc = subprocess.run([sys.executable, "benchmarks/bench_search.py", "--tiny", "--trials", "2", "--trial-iters", "2",
                           "--seeds", "1", "--workers", "1", "--out", str(out), "--fidelity-out", str(fout)],
                          cwd=REPO, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    data = json.loads((out / "search_bench.json").read_text())
    assert "## Checks" in (out / "search_bench.md").read_text() and (out / "search.png").stat().st_size > 0
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["dense", "single", "searched"]
    T = bf.TINY.seg_iters
    for r in rows.values():  # equal total training: every row T iterations from the pretrained backbone
        assert r["iters_total"] == T and r["n"] == 1 and all(isinstance(v, float) for v in r["values"]), r
    single, searched = rows["single"], rows["searched"]
    assert searched["macs"] <= single["macs"] < rows["dense"]["macs"]  # the budget, as the framework counts MACs
    assert abs(single["macs_cut"] - 0.5) <= 0.005 and data["checks"] and all(c["ok"] for c in data["checks"])
    assert data["search"]["trials"] == 2 and len(data["trials_table"]) == 2
    assert data["best"]["size"] <= data["search"]["max_size"]
    assert {k for k, _ in data["overrides"]} == set(data["best"]["params"])
    # the references are the fidelity bench's own jobs (same names, same cache); the searched one its own
    lrpet = bf.Job("seg", "lrpet", 0.5, 0, T, 0)
    plan = bf.Job("seg", "lrpet", 0.5, 0, T, 0, overrides=tuple((k, float(v)) for k, v in data["overrides"]))
    assert set(data["results"]) == {"seg_dense_dense_s0_0+4", lrpet.name, plan.name}
    assert plan.name.startswith(lrpet.name + "_o")
    assert data["results"][plan.name]["plan_cut"] == pytest.approx(1 - data["best"]["size"], abs=1e-12)
    key = bf._settings_key(bf.TINY, lrpet)
    assert all((fout / "jobs" / f"{name}_{key}.json").is_file() for name in data["results"])


# -- statistics and checks on synthetic results (fast) ------------------------------------------------------------
def _r(fw, method, values, cut=None, iters=10, start=0, macs=100.0, **extra):
    return [dict(fw=fw, method=method, cut=cut, seed=i, iters=iters, start=start, group="core50", value=v,
                 value_as_trained=v, macs={"macs": macs}, **extra) for i, v in enumerate(values)]


def _results(*groups):
    out = {}
    for g in groups:
        for r in g:
            out[f"{r['method']}_{r['cut']}_{r['seed']}_{r['start']}_{r['iters']}"] = r
    return out


def _check(summary, text):
    found = [c for c in summary["checks"] if text in c["check"]]
    assert found, (text, summary["checks"])
    return found[0]["ok"]


B = bf.Budget(seg_iters=10, seeds=3)


def test_convergence_check_passes_only_on_a_flat_curve():
    flat = _results(_r("seg", "dense", [30.0, 30.4, 29.8], iters=5), _r("seg", "dense", [30.1, 30.5, 29.9]))
    assert _check(bf.summarise(flat, B, {}), "dense converged") is True
    rising = _results(_r("seg", "dense", [28.0, 28.4, 27.8], iters=5), _r("seg", "dense", [30.1, 30.5, 29.9]))
    assert _check(bf.summarise(rising, B, {}), "dense converged") is False
    # a seed spread so wide that a large gain is below one standard error shows nothing: not converged
    noisy = _results(_r("seg", "dense", [20.0, 40.0, 30.0], iters=5), _r("seg", "dense", [15.0, 45.0, 42.0]))
    summary = bf.summarise(noisy, B, {})
    check = next(c for c in summary["checks"] if "dense converged" in c["check"])
    assert check["gain"] < check["se"] and check["se"] > bf.CONVERGED_MAX_SE and check["ok"] is False


def test_dense_finetuned_check_and_macs_checks_can_fail():
    dense = _r("seg", "dense", [30.0, 30.2, 29.8])
    far = _r("seg", "ft-dense", [33.0, 33.2, 32.8], iters=4, start=10)
    s = bf.summarise(_results(dense, far), B, {})
    assert _check(s, "dense fine-tuned 4 iterations") is False
    near = _r("seg", "ft-dense", [30.1, 29.9, 30.3], iters=4, start=10)
    assert _check(bf.summarise(_results(dense, near), B, {}), "dense fine-tuned 4 iterations") is True
    off = _r("seg", "lrpet", [25.0, 25.5, 24.8], cut=0.5, macs=52.0)  # a 48% cut where 50% was asked
    assert _check(bf.summarise(_results(dense, off), B, {}), "lrpet at 50%") is False
    ok = _r("seg", "lrpet", [25.0, 25.5, 24.8], cut=0.5, macs=50.2)
    assert _check(bf.summarise(_results(dense, ok), B, {}), "lrpet at 50%") is True
    over = _r("seg", "prune-ft", [20.0, 21.0, 19.0], cut=0.5, iters=1, start=9, macs=51.0,
              pruning={"target_macs": 50.0})
    assert _check(bf.summarise(_results(dense, ok, over), B, {}), "prune-ft at 50%") is False


def test_welch_p_values_and_goals():
    dense = _r("seg", "dense", [30.0, 30.2, 29.8])
    lrpet = _r("seg", "lrpet", [29.5, 29.7, 29.3], cut=0.3, macs=70.0)
    lrpet50 = _r("seg", "lrpet", [28.0, 28.3, 27.9], cut=0.5, macs=50.0)
    svd = _r("seg", "svd-ft", [25.0, 25.4, 24.9], cut=0.5, iters=1, start=9, macs=50.0)
    prune = _r("seg", "prune-ft", [12.0, 12.5, 11.8], cut=0.3, iters=1, start=9, macs=69.0,
               pruning={"target_macs": 70.0})
    s = bf.summarise(_results(dense, lrpet, lrpet50, svd, prune), B, {"seg": 10.0})
    row = next(r for r in s["rows"] if r["method"] == "svd-ft")
    from scipy import stats

    assert row["p"] == pytest.approx(stats.ttest_ind([25.0, 25.4, 24.9], [28.0, 28.3, 27.9], equal_var=False).pvalue)
    assert row["vs_lrpet"] == pytest.approx(statistics_mean([25.0, 25.4, 24.9]) - statistics_mean([28.0, 28.3, 27.9]))
    goals = {g["goal"].split(" at ")[0][:40]: g["met"] for g in s["goals"]}
    assert list(goals.values()) == [True, True, False], s["goals"]  # 0.5 below dense; ahead with p < 0.05; prune low
    assert bf.welch_p([1.0], [2.0, 3.0]) is None


def test_job_overrides_are_part_of_the_identity_and_leave_other_names_alone():
    plain = bf.Job("seg", "lrpet", 0.5, 1, 300, 0)
    assert plain.name == "seg_lrpet_0.5_s1_0+300"  # the job cache's file names of existing runs
    plan = (("backbone.layer1.*", 0.4), ("backbone.layer2.*", 0.65))
    a, b = bf.Job("seg", "lrpet", 0.5, 1, 300, 0, overrides=plan), bf.Job("seg", "lrpet", 0.5, 1, 300, 0, "x", plan)
    assert a == b and a.name == b.name and a != plain and a.name.startswith(plain.name + "_o")
    other = bf.Job("seg", "lrpet", 0.5, 1, 300, 0, overrides=(("backbone.layer1.*", 0.4), ("backbone.layer2.*", 0.6)))
    assert other.name != a.name
    assert a.deps(B) == plain.deps(B)  # from the same pretrained backbone
    for bad in ((("backbone.layer1.*", 1.0),), (("backbone.layer1.*", 1),), [("backbone.layer1.*", 0.4)]):
        with pytest.raises(ValueError, match="overrides"):
            bf.Job("seg", "lrpet", 0.5, overrides=bad)
    for fw, method in (("seg", "svd-ft"), ("det", "lrpet")):
        with pytest.raises(ValueError, match="LRPET row"):
            bf.Job(fw, method, 0.5, overrides=plan)
    opts = bf.lrpet_hook_options(B, "lrpet", 0.5, 300, 20, plan)
    assert opts["target_macs_cut"] is None and opts["overrides"] == dict(plan)
    assert bf.lrpet_hook_options(B, "lrpet", 0.5, 300, 20)["target_macs_cut"] == 0.5


def statistics_mean(v):
    return sum(v) / len(v)


def test_every_equal_training_row_trains_T_iterations_in_all():
    b = bf.Budget(seg_iters=100, det_iters=80)
    jobs = bf.plan_jobs(b, ["seg", "det"])
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    for j in jobs:
        for d in j.deps(b):  # dependencies come first
            assert names.index(d.name) < names.index(j.name), (j.name, d.name)
        T = bf.budget_iters(b, j.fw)
        if j.method in ("lrpet", "lrp", "lrp-et", "lrpet-energy", "lrpet-ramp", "lrpet-p5", "scratch", "svd-ft", "prune-ft",
                        "lrpet-early"):
            assert j.start + j.iters == T, j.name
        if j.method in ("svd-ft", "prune-ft"):  # the dense model they start from trained the rest
            (d,) = j.deps(b)
            assert d.method == "dense" and d.iters == j.start
    # the priority order: the 50% core rows before anything else
    first = [j.group for j in jobs]
    assert first.index("core30") > max(i for i, g in enumerate(first) if g == "core50")


def test_the_pretraining_is_reused_when_only_the_target_task_changes():
    pre, row = bf.Job("seg", "pretrain", None, 0, 1000), bf.Job("seg", "dense", None, 0, 300)
    target = replace(bf.FULL, image_size=64, crop=48, lr=0.02, train_images=80, seg_iters=600,
                     target_classes=("car", "person"))
    assert bf._settings_key(target, pre) == bf._settings_key(bf.FULL, pre)
    assert bf._settings_key(target, row) != bf._settings_key(bf.FULL, row)
    for change in (dict(source_image_size=64), dict(source_crop=48), dict(source_lr=0.02), dict(pretrain_iters=500),
                   dict(source_images=80), dict(batch=8)):  # another pretraining: every segmentation row with it
        other = replace(bf.FULL, **change)
        assert bf._settings_key(other, pre) != bf._settings_key(bf.FULL, pre), change
        assert bf._settings_key(other, row) != bf._settings_key(bf.FULL, row), change
    det = bf.Job("det", "dense", None, 0, 300)
    assert bf._settings_key(target, det) == bf._settings_key(bf.FULL, det)


def test_budget_options_are_read_as_the_fields_types():
    got = bf.budget_options(["image_size=64", "lr=0.02", "target_classes=car, person", "seg_curve=0.25,0.5",
                             "finetune_curve="])
    assert got == dict(image_size=64, lr=0.02, target_classes=("car", "person"), seg_curve=(0.25, 0.5),
                       finetune_curve=())
    assert bf.budget_options(["lr=1"]) == dict(lr=1.0) and isinstance(bf.budget_options(["lr=1"])["lr"], float)
    for bad, match in (("image_size=0.5", "not an integer"), ("crop", "KEY=VALUE"), ("colour=red", "KEY one of"),
                       ("groups=core50", "--groups"), ("seg_curve=a", "list of numbers"), ("lr=-1", ">= 0"),
                       ("lr=nan", "finite"), ("image_size=64,96", "one integer")):
        with pytest.raises(ValueError, match=match):
            bf.budget_options([bad])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_fidelity.py"), "--tiny",
                           "--budget-options", "crop=x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "crop: 'x' is not an integer" in proc.stderr


def test_the_curve_group_is_the_dense_learning_curve_alone():
    b = replace(bf.FULL, groups=("curve",), seg_curve=(0.5,))
    jobs = bf.plan_jobs(b, ["seg", "det"])
    assert [j.name for j in jobs] == ["seg_pretrain_dense_s0_0+1000"] + [
        f"seg_dense_dense_s{s}_0+{n}" for n in (150, 300) for s in range(3)]
    core = bf.plan_jobs(replace(bf.FULL, groups=("core30",)), ["seg"])  # a core group runs the curve it needs
    assert {j.name for j in jobs} < {j.name for j in core}


def test_the_recorded_command_names_no_folder_of_this_machine():
    from _common import command_line  # benchmarks/_common.py

    argv = ["--out", "/somewhere/else/out", "--voc-root", str(REPO / "data" / "voc"), "--groups", "core50", "a b"]
    assert command_line("bench_fidelity.py", argv) == (
        "python benchmarks/bench_fidelity.py --out PATH --voc-root data/voc --groups core50 'a b'")
