"""Faults: a training process killed hard and resumed, a projection that fails midway, diverged
(NaN/Inf) weights, and interrupted writes of the compression tools; both frameworks.

The SIGKILL tests start the real entry points (``tools/train_det.py``, mmseg's own
``tools/train.py``), kill them with SIGKILL once a checkpoint is on disk, resume them with the
framework's own ``--resume`` and compare the final checkpoint with the uninterrupted run of
``conftest`` bit for bit.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch import nn

from conftest import REPO, SEG_TOY_CFG, d2_train, d2_train_cmd, mmseg_tools, seg_env

from lrpet_dense.core import LRPETConfig, ProjectionError, build_rank_plan
from lrpet_dense.core.selection import layer_specs
import lrpet_dense.core.projection as projection_mod
from lrpet_dense.io import atomic_save

pytestmark = pytest.mark.timeout(600)


def _load(path):
    # mmseg's runner writes stock mmengine checkpoints (HistoryBuffer in message_hub): weights-only loading
    # needs the plugin's allow-list, which importing lrpet_dense.mmseg registers (as in the tools)
    import lrpet_dense.mmseg  # noqa: F401
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _kill_after_checkpoint(cmd, env, cwd, out_dir: Path, log: Path, timeout: float = 400) -> str:
    """Start ``cmd``, SIGKILL it as soon as ``out_dir/last_checkpoint`` exists; return that file's text."""
    marker = out_dir / "last_checkpoint"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not (marker.exists() and marker.read_text().strip()):
                assert proc.poll() is None, f"training ended before a checkpoint ({proc.returncode}):\n" \
                                            f"{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, "no checkpoint within the time limit"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return marker.read_text().strip()


def _assert_same_state(resumed: dict, full: dict) -> None:
    assert resumed.keys() == full.keys()
    different = [k for k in full if not torch.equal(resumed[k], full[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


# ------------------------------------------------------------------------------ SIGKILL + resume
@pytest.mark.slow
def test_detectron2_sigkill_then_resume_equals_uninterrupted(d2_run, d2_toy_voc, tmp_path):
    pytest.importorskip("detectron2")
    full_dir, _ = d2_run
    out = tmp_path / "killed"
    env = dict(os.environ, LRPET_TOY_VOC=d2_toy_voc)
    name = _kill_after_checkpoint(d2_train_cmd(out), env, REPO, out, tmp_path / "killed.log")
    assert not (out / "model_final.pth").exists(), "the run finished before it was killed"
    steps_done = int(re.fullmatch(r"model_(\d+)\.pth", name).group(1)) + 1
    assert steps_done in (2, 4)
    saved = _load(out / name)["trainer"]["hooks"]

    # Resume with another MAC target: the schedule and the plan must come from the checkpoint.
    text = d2_train(d2_toy_voc, out, "--resume", "LRPET.TARGET_MACS_CUT", "0.3")
    assert "continuing with the checkpoint's plan" in text
    assert f"RNG states restored from the checkpoint before iteration {steps_done}" in text
    assert [int(s) for s in re.findall(r"LRPET projection at step (\d+)", text)] == [s for s in (2, 4, 5)
                                                                                        if s > steps_done]
    full, resumed = _load(full_dir / "model_final.pth"), _load(out / "model_final.pth")
    assert saved["LRPETHook"]["plan"] == full["trainer"]["hooks"]["LRPETHook"]["plan"]
    assert resumed["trainer"]["hooks"]["LRPETHook"] == full["trainer"]["hooks"]["LRPETHook"]
    assert resumed["trainer"]["hooks"]["LRPETHook"]["projector"] == {"last_iter": 5, "num_projections": 3}
    _assert_same_state(resumed["model"], full["model"])


@pytest.mark.slow
def test_mmseg_sigkill_then_resume_equals_uninterrupted(seg_run, seg_toy_data, tmp_path):
    pytest.importorskip("mmseg")
    wd = tmp_path / "killed"
    wd.mkdir()
    cmd = [mmseg_tools() / "train.py", SEG_TOY_CFG, "--work-dir", wd]
    last = _kill_after_checkpoint(cmd, seg_env(seg_toy_data), wd, wd, tmp_path / "killed.log")
    assert Path(last).name == "iter_2.pth"
    assert not (wd / "iter_3.pth").exists(), "the run finished before it was killed"

    # mmseg's own --resume, with another ratio: the plan and the schedule come from the checkpoint.
    proc = subprocess.run([sys.executable, *map(str, cmd), "--resume", "--cfg-options", "custom_hooks.0.ratio=0.3"],
                          env=seg_env(seg_toy_data), cwd=wd, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-5000:]
    text = proc.stdout + proc.stderr
    assert "continuing with the checkpoint's plan" in text
    assert re.findall(r"LRPET projection (\d+) after iteration (\d+)", text) == [("2", "3")]
    full, resumed = _load(seg_run / "iter_3.pth"), _load(wd / "iter_3.pth")
    assert resumed["lrpet"] == full["lrpet"]
    assert resumed["lrpet"]["projector"] == {"last_iter": 3, "num_projections": 2}
    _assert_same_state(resumed["state_dict"], full["state_dict"])


# ------------------------------------------------------------------------------ failing projection
def _fail_on(layer_name: str, times: int = 1):
    """A ``compute_projection`` that raises for ``layer_name`` (the first ``times`` calls)."""
    real = projection_mod.compute_projection
    calls = {"n": 0}

    def fake(weight, rank, bn_scale, config, name="weight"):
        if name == layer_name and calls["n"] < times:
            calls["n"] += 1
            raise RuntimeError("injected failure")
        return real(weight, rank, bn_scale, config, name=name)
    return fake


class _D2Model(nn.Module):
    """Five detectron2 conv+BN layers; the fifth is ``backbone.4``."""

    def __init__(self):
        super().__init__()
        from detectron2.layers import Conv2d
        self.backbone = nn.Sequential(*[Conv2d(3 if i == 0 else 16, 16, 3, padding=1, bias=False,
                                               norm=nn.BatchNorm2d(16)) for i in range(5)])

    def forward(self, x):
        return {"loss": self.backbone(x).square().mean()}


def _d2_setup(on_error: str):
    pytest.importorskip("detectron2")
    from detectron2.engine import HookBase, SimpleTrainer

    from lrpet_dense.detectron2 import LRPETHook, pair_convs

    torch.manual_seed(0)
    model = _D2Model()
    layers = pair_convs(model).layers
    plan = build_rank_plan(layer_specs(layers, {l.name: (8, 8) for l in layers}), LRPETConfig(ratio=0.5))
    hook = LRPETHook(model, LRPETConfig(interval=3, on_error=on_error), layers=layers, plan=plan)

    class Snapshot(HookBase):  # the weights right before the projection of each step
        def after_step(self):
            self.weights = {k: v.clone() for k, v in model.state_dict().items()}

    g = torch.Generator().manual_seed(1)
    data = iter([torch.randn(2, 3, 8, 8, generator=g) for _ in range(8)])
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01))
    snap = Snapshot()
    trainer.register_hooks([snap, hook])
    return model, layers, plan, hook, trainer, snap


@pytest.mark.slow
def test_detectron2_failure_midway_raise_changes_nothing(monkeypatch):
    model, layers, _, _, trainer, snap = _d2_setup("raise")
    assert layers[4].name == "backbone.4"
    monkeypatch.setattr(projection_mod, "compute_projection", _fail_on("backbone.4"))
    with pytest.raises(ProjectionError, match=r"after step 3 .*'backbone\.4'.*injected failure") as err:
        trainer.train(0, 7)
    assert err.value.iteration == 3 and trainer.iter == 2  # stopped in the step that projects
    for k, v in model.state_dict().items():  # layers 0-3 were computed, but none was written
        assert torch.equal(v, snap.weights[k]), k


@pytest.mark.slow
def test_detectron2_failure_midway_skip_trains_on(monkeypatch, caplog):
    model, layers, plan, hook, trainer, _ = _d2_setup("skip")
    monkeypatch.setattr(projection_mod, "compute_projection", _fail_on("backbone.4"))
    with caplog.at_level("ERROR", logger="lrpet_dense.core.schedule"):
        trainer.train(0, 7)
    assert trainer.iter == 7  # training went on to the end
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "after step 3" in errors[0] and "'backbone.4'" in errors[0]
    failed = trainer.storage.history("lrpet/failed").values()
    assert [it for _, it in failed] == [2]  # storage iteration 2 = after step 3
    assert [it for _, it in trainer.storage.history("lrpet/energy_kept_mean").values()] == [5, 6]
    assert hook.projector.num_projections == 2 and hook.projector.num_failed == 1
    for l in layers:  # the later projections (steps 6, 7) did their job
        assert torch.linalg.matrix_rank(l.conv.weight.detach().reshape(16, -1)) == plan[l.name].rank


def _seg_setup(on_error: str, max_iters: int = 4):
    pytest.importorskip("mmseg")
    from lrpet_dense.mmseg import LRPETHook

    class Net(nn.Module):  # an mmseg-style model: Sequential(conv, bn, ...) backbone
        def __init__(self):
            super().__init__()
            mods = []
            for i in range(5):
                mods += [nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)]
            self.backbone = nn.Sequential(*mods)

    torch.manual_seed(0)
    model = Net()
    hook = LRPETHook(ratio=0.5, interval=2, plan_input_size=(8, 8), on_error=on_error)
    runner = mock.MagicMock()
    runner.model, runner.max_iters, runner.iter = model, max_iters, 0
    hook.before_train(runner)
    return model, hook, runner


@pytest.mark.slow
def test_mmseg_failure_midway_raise_changes_nothing(monkeypatch):
    model, hook, runner = _seg_setup("raise")
    assert hook.layers[4].name == "backbone.8"  # the fifth conv
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(projection_mod, "compute_projection", _fail_on("backbone.8"))
    runner.iter = 1  # after iteration 2
    with pytest.raises(ProjectionError, match=r"after step 2 .*'backbone\.8'.*injected failure"):
        hook.after_train_iter(runner, 1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert hook.projector.num_projections == 0


@pytest.mark.slow
def test_mmseg_failure_midway_skip_trains_on(monkeypatch, caplog):
    model, hook, runner = _seg_setup("skip")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(projection_mod, "compute_projection", _fail_on("backbone.8"))
    runner.iter = 1
    with caplog.at_level("ERROR", logger="lrpet_dense.core.schedule"):
        hook.after_train_iter(runner, 1)  # fails, is logged, nothing changes
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "after step 2" in errors[0] and "'backbone.8'" in errors[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    runner.iter = 3  # the last iteration: projects (the injected failure was one-off)
    hook.after_train_iter(runner, 3)
    assert hook.projector.num_projections == 1 and hook.projector.last_iter == 4
    for p in hook.layers:
        assert torch.linalg.matrix_rank(p.conv.weight.detach().reshape(16, -1)) == hook.plan[p.name].rank


# ------------------------------------------------------------------------------ NaN / Inf weights
def test_detectron2_nan_weights_reported_with_layer_and_step():
    pytest.importorskip("detectron2")
    from detectron2.utils.events import EventStorage

    from lrpet_dense.detectron2 import LRPETHook, pair_convs

    model = _D2Model()
    layers = pair_convs(model).layers
    plan = build_rank_plan(layer_specs(layers, {l.name: (8, 8) for l in layers}), LRPETConfig(ratio=0.5))
    hook = LRPETHook(model, LRPETConfig(interval=3), layers=layers, plan=plan)
    with torch.no_grad():
        model.backbone[2].weight[0, 0, 0, 0] = float("nan")
        model.backbone[3].weight[1, 1, 1, 1] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with EventStorage(5) as storage:
        hook.trainer = SimpleNamespace(iter=5, max_iter=10, storage=storage)  # after step 6
        with pytest.raises(ProjectionError, match=r"after step 6 .*'backbone\.2'.*NaN/Inf"):
            hook.after_step()
    for k, v in model.state_dict().items():  # NaN != NaN: compare with NaN/Inf mapped to numbers
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k


def test_mmseg_nan_weights_reported_with_layer_and_step():
    model, hook, runner = _seg_setup("raise")
    with torch.no_grad():
        model.backbone[4].weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner.iter = 3  # the last iteration (4)
    with pytest.raises(ProjectionError, match=r"after step 4 .*'backbone\.4'.*NaN/Inf"):
        hook.after_train_iter(runner, 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k
    # no checkpoint state is produced for a projection that did not happen
    assert hook.projector.num_projections == 0 and hook.projector.last_iter is None


def test_compress_tools_refuse_nan_checkpoints(d2_small_ckpts, seg_small_ckpts, tmp_path, monkeypatch, capsys):
    """Our tools never turn diverged weights into a compressed checkpoint."""
    pytest.importorskip("detectron2")
    pytest.importorskip("mmseg")
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import compress_det
        import compress_seg
    finally:
        sys.path.remove(str(REPO / "tools"))
    ckpt = _load(d2_small_ckpts[1])
    ckpt["model"]["backbone.res3.0.conv1.weight"][0, 0] = float("nan")
    bad = tmp_path / "d2_nan.pth"
    torch.save(ckpt, bad)
    out = tmp_path / "d2_out.pth"
    from conftest import D2_TINY, D2_TOY_CFG
    assert compress_det.main(["--config", str(D2_TOY_CFG), "--checkpoint", str(bad), "--output", str(out),
                              "--no-flops", *D2_TINY]) == 2
    assert re.search(r"error: .*'backbone\.res3\.0\.conv1\.weight' has \d+ NaN/Inf", capsys.readouterr().err)
    assert not out.exists()

    ckpt = _load(seg_small_ckpts[1])
    ckpt["state_dict"]["backbone.layer1.0.conv1.weight"][0] = float("inf")
    bad = tmp_path / "seg_nan.pth"
    torch.save(ckpt, bad)
    out = tmp_path / "seg_out.pth"
    monkeypatch.setenv("LRPET_TOY_VOC_ROOT", str(tmp_path))
    assert compress_seg.main([str(SEG_TOY_CFG), str(bad), str(out)]) == 2
    assert re.search(r"error: .*'backbone\.layer1\.0\.conv1\.weight' has \d+ NaN/Inf", capsys.readouterr().err)
    assert not out.exists()


# ------------------------------------------------------------------------------ atomic writes
def _failing_save(obj, f, *args, **kwargs):
    """A ``torch.save`` interrupted midway: part of the file is written, then it dies."""
    f.write(b"PK\x03\x04 half a checkpoint")
    raise KeyboardInterrupt("killed while writing")


def test_atomic_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "out.pth"
    atomic_save({"x": torch.ones(2)}, str(target))
    good = _sha(target)
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"x": torch.zeros(2)}, str(target))
    assert _sha(target) == good  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"]  # no temp file left


def test_compress_det_interrupted_save(d2_small_ckpts, tmp_path, monkeypatch):
    pytest.importorskip("detectron2")
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import compress_det
    finally:
        sys.path.remove(str(REPO / "tools"))
    from conftest import D2_TINY, D2_TOY_CFG

    src = tmp_path / "in" / "model_final.pth"  # a projected dense checkpoint carrying its plan
    src.parent.mkdir()
    shutil.copy(d2_small_ckpts[1], src)
    digest, mtime = _sha(src), src.stat().st_mtime_ns
    out_dir = tmp_path / "out"
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(KeyboardInterrupt):
        compress_det.main(["--config", str(D2_TOY_CFG), "--checkpoint", str(src), "--output",
                           str(out_dir / "compressed.pth"), "--no-flops", *D2_TINY])
    assert list(out_dir.iterdir()) == []  # no half-written output, no temp file
    assert _sha(src) == digest and src.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in src.parent.iterdir()) == ["model_final.pth"]


def test_compress_seg_interrupted_save(seg_small_ckpts, tmp_path, monkeypatch):
    pytest.importorskip("mmseg")
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import compress_seg
    finally:
        sys.path.remove(str(REPO / "tools"))
    import lrpet_dense.mmseg

    src = tmp_path / "in" / "iter_3.pth"  # a projected dense checkpoint carrying its plan
    src.parent.mkdir()
    shutil.copy(seg_small_ckpts[1], src)
    digest, mtime = _sha(src), src.stat().st_mtime_ns
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setenv("LRPET_TOY_VOC_ROOT", str(tmp_path))  # the config's data root; no data is read
    # the MAC count (get_model_complexity_info) is irrelevant here and slow: a stand-in
    monkeypatch.setattr(lrpet_dense.mmseg, "count_complexity",
                        lambda model, hw: {k: {"params": 1, "macs": 1} for k in ("backbone", "model")})
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(KeyboardInterrupt):
        compress_seg.main([str(SEG_TOY_CFG), str(src), str(out_dir / "compressed.pth")])
    assert list(out_dir.iterdir()) == []
    assert _sha(src) == digest and src.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in src.parent.iterdir()) == ["iter_3.pth"]


# ------------------------------------------------------------------------------ RNG state, 2 processes
def _rng_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from lrpet_dense.detectron2 import RNGStateHook

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # every worker has its own streams (detectron2 seeds SEED + rank)
        hook = RNGStateHook(period=2, max_iter=10)
        hook.trainer = SimpleNamespace(iter=3)  # after step 4: a checkpoint step
        hook.after_step()  # a collective: gathers every worker's states
        state = hook.state_dict()  # what the main process would save
        expected = torch.rand(5)  # each worker's next draws
        torch.rand(50)
        hook.load_state_dict(torch.load(_save_plain(state, out, rank), weights_only=True))
        hook.before_step()  # restores this worker's own streams
        torch.save({"expected": expected, "got": torch.rand(5), "n_states": len(state["states"])},
                   os.path.join(out, f"rank{rank}.pth"))
    finally:
        dist.destroy_process_group()


def _save_plain(state, out, rank) -> str:
    path = os.path.join(out, f"state{rank}.pth")
    torch.save(state, path)
    return path


@pytest.mark.slow
def test_rng_state_hook_two_workers(tmp_path):
    """Each worker gets its own RNG streams back from the (main process's) checkpoint state."""
    pytest.importorskip("detectron2")
    torch.multiprocessing.spawn(_rng_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [_load(tmp_path / f"rank{r}.pth") for r in range(2)]
    assert all(r["n_states"] == 2 for r in results)
    assert all(torch.equal(r["got"], r["expected"]) for r in results)
    assert not torch.equal(results[0]["expected"], results[1]["expected"])  # really per worker
