"""LRPET-S: the rank search with Optuna, in both frameworks, on the toy data (a few tiny trials)."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import D2_TINY, D2_TOY_CFG, REPO, SEG_TOY_CFG

from lrpet_dense.search import SearchOptions, layer_groups, pareto_front, snippets

pytestmark = pytest.mark.timeout(900)
CLI = Path(sys.executable).parent / "lrpet-dense"


def test_groups_pareto_options_snippets():
    names = ["backbone.res3.0.conv1", "backbone.res3.1.conv2", "backbone.res4.0.conv1", "roi_heads.res5.2.conv3",
             "backbone.fpn_lateral2"]
    assert layer_groups(names) == {"backbone.res3.*": names[:2], "backbone.res4.*": [names[2]],
                                   "roi_heads.res5.*": [names[3]], "backbone.*": [names[4]]}
    assert list(layer_groups(names, "block"))[:2] == ["backbone.res3.0.*", "backbone.res3.1.*"]
    assert pareto_front([(0.5, 10.0), (0.4, 12.0), (0.6, 9.0), (0.5, 11.0), (0.7, 9.5)]) == [1, 0, 2]
    for bad, match in ((dict(lam=-1), "lambda"), (dict(low=0.8, high=0.2), "range"), (dict(max_size=0), "max_size"),
                       (dict(sampler="cmaes"), "sampler"), (dict(measure="flops"), "measure")):
        with pytest.raises(ValueError, match=match):
            SearchOptions(**bad)
    s = snippets({"backbone.res3.*": 0.6, "backbone.res4.*": 0.4})
    assert s["detectron2"] == 'LRPET:\n  OVERRIDES: ["backbone.res3.*", 0.6000, "backbone.res4.*", 0.4000]'
    import ast

    literal = s["mmseg"][s["mmseg"].index("overrides=") + len("overrides="):-2]
    assert ast.literal_eval(literal) == {"backbone.res3.*": 0.6, "backbone.res4.*": 0.4}


def _run(args, env=None, timeout=600):
    proc = subprocess.run([str(a) for a in args], cwd=REPO, env=dict(os.environ, **(env or {})), capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _trials(db: Path):
    with sqlite3.connect(db) as con:
        return con.execute("select number, state from trials order by number").fetchall()


@pytest.mark.slow
def test_seg_search_runs_resumes_and_reports(seg_toy_data, tmp_path):
    env = {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)}
    out = tmp_path / "search"
    base = [CLI, "search", "seg", SEG_TOY_CFG, "--out", out, "--trial-iters", "2", "--startup-trials", "1"]
    # a search killed during its second trial keeps the first one, and the rerun goes on from there
    proc = subprocess.Popen([str(a) for a in base + ["--trials", "3"]], cwd=REPO, env=dict(os.environ, **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "lrpet_search.db"
    deadline = time.time() + 400
    while time.time() < deadline:
        if db.exists() and any(state == "COMPLETE" for _, state in _trials(db)):
            break
        time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [n for n, state in _trials(db) if state == "COMPLETE"]
    assert first == [0], _trials(db)
    code, text = _run(base + ["--trials", "1"], env)
    assert code == 0, text[-3000:]
    done = [n for n, state in _trials(db) if state == "COMPLETE"]
    assert 0 in done and len(done) == 2  # the killed search's trial kept, one more run
    report = (out / "search.md").read_text()
    assert "Best trial" in report and "OVERRIDES" in report and "overrides={" in report
    assert (out / "search.png").exists() and (out / "search.json").exists()
    for stage in ("backbone.layer1", "backbone.layer4", "backbone.stem"):
        assert stage in report


@pytest.mark.slow
def test_det_search_two_trials(d2_toy_voc, tmp_path):
    out = tmp_path / "search"
    code, text = _run([CLI, "search", "det", "--config", D2_TOY_CFG, "--out", out, "--trials", "2", "--trial-iters", "2",
                       "--startup-trials", "1", "--sampler", "tpe", *D2_TINY], {"LRPET_TOY_VOC": d2_toy_voc})
    assert code == 0, text[-3000:]
    assert len([n for n, s in _trials(out / "lrpet_search.db") if s == "COMPLETE"]) == 2
    assert "backbone.res3.*" in (out / "search.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("extra, match", [
    (["--lambda", "-1"], "lambda must be a finite number >= 0"),
    (["--max-size", "0.01"], "no plan can meet the budget"),
    (["--storage", "mysql+pymysql://nobody@127.0.0.1:1/none"], "cannot open the Optuna storage"),
    (["--cfg-options", "custom_hooks=[]"], "no LRPETHook in custom_hooks"),
])
def test_seg_search_bad_input(seg_toy_data, tmp_path, extra, match):
    code, text = _run([CLI, "search", "seg", SEG_TOY_CFG, "--out", tmp_path, "--trials", "1", "--trial-iters", "1",
                       *extra], {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)})
    assert code == 2 and match in text, text[-2000:]
    assert not list(tmp_path.glob("trial_*"))  # refused before any training


@pytest.mark.slow
def test_det_search_without_lrpet_is_refused(d2_toy_voc, tmp_path):
    code, text = _run([CLI, "search", "det", "--config", D2_TOY_CFG, "--out", tmp_path, "--trials", "1",
                       *D2_TINY, "LRPET.ENABLED", "False"], {"LRPET_TOY_VOC": d2_toy_voc})
    assert code == 2 and "LRPET.ENABLED False" in text


class _Runner:
    """A stand-in for a framework's trials (the engine's own behaviour under test): trial 0 diverges
    with NaN, trial 1 raises the trainers' FloatingPointError, the rest score by their size."""

    metric = "mIoU"

    def __init__(self, names):
        self.names, self.calls = names, 0

    def size_ratio(self, overrides, measure):
        return 1 - sum(overrides.values()) / len(overrides) / 2

    def train_and_score(self, overrides, work_dir, seed):
        self.calls += 1
        if self.calls == 1:
            return float("nan")
        if self.calls == 2:
            raise FloatingPointError("Loss became infinite or NaN at iteration=3!")
        return 50.0 + 10 * sum(overrides.values())


def test_search_engine_prunes_diverged_trials_and_refuses_an_empty_space(tmp_path):
    import optuna

    from lrpet_dense.search import run_search

    runner = _Runner(["backbone.layer1.0.conv1", "backbone.layer2.0.conv1"])
    summary = run_search(runner, SearchOptions(trials=4, startup_trials=2, sampler="tpe"), str(tmp_path))
    states = [t["state"] for t in summary["trials"]]
    assert states == ["PRUNED", "PRUNED", "COMPLETE", "COMPLETE"]
    assert summary["best"]["number"] in (2, 3) and summary["best"]["mIoU"] > 50
    study = optuna.load_study(study_name="lrpet-search", storage=f"sqlite:///{tmp_path / 'lrpet_search.db'}")
    assert len(study.trials) == 4  # in the database
    with pytest.raises(ValueError, match="search space is empty"):
        run_search(_Runner([]), SearchOptions(trials=1), str(tmp_path / "empty"))


def test_check_finite():
    import torch

    from lrpet_dense.search import check_finite

    model = torch.nn.Linear(2, 2)
    check_finite(model)
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="bias"):
        check_finite(model)
