"""Shared toy datasets and uninterrupted training runs (session-scoped: each framework trains once).

``tests/test_detectron2.py`` and ``tests/test_faults.py`` share the detectron2 run ``d2_run``;
``tests/test_mmseg.py`` and ``tests/test_faults.py`` share the mmseg run ``seg_run``. The helpers
below are imported by those files (``from conftest import ...``) so both use the very same settings.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from lrpet_dense.configs import config_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Under pytest-xdist (the README's test command runs two workers), each worker's own torch computations get
    an equal share of the cores instead of all of them (2 workers x 2 threads on 2 cores ran slower), and so do
    the tools, trainings and benchmarks the tests start as subprocesses (OMP_NUM_THREADS, unless already set)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        share = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


# The most the whole suite holds at once in its temporary folders: 8.5 GB measured on the AMD EPYC (2026-12-07) with
# pyproject's tmp_path_retention_policy = "failed" (a passed test's folder goes when it ends), module_temp below (a
# module's training runs go when its tests are done) and the session-scoped runs removed when the session passes.
# A full disk shows as a storm of setup errors, so the free space is printed.
SUITE_TEMP_PEAK_GB = 10


def _temp_free_gb(config) -> tuple[Path, float]:
    """The folder pytest's temporary folders go under (``--basetemp`` or the system's), and its disk's free GB."""
    given = config.option.basetemp
    root = Path(given).resolve() if given else Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir())
    while not root.exists() and root != root.parent:
        root = root.parent
    return root, shutil.disk_usage(root).free / 1e9


def pytest_report_header(config) -> str:
    root, free = _temp_free_gb(config)
    short = "" if free >= SUITE_TEMP_PEAK_GB else ": LESS than the whole suite needs, expect 'No space left' errors"
    return f"temporary folders under {root}: {free:.1f} GB free (the whole suite needs up to {SUITE_TEMP_PEAK_GB} GB){short}"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """A failed run on a short disk says so at its end (``-q`` hides the header; a failed run keeps its folders)."""
    root, free = _temp_free_gb(config)
    if exitstatus != 0 and free < SUITE_TEMP_PEAK_GB:
        terminalreporter.write_sep("!", f"temporary folders under {root}: {free:.2f} GB free (the whole suite needs up to "
                                   f"{SUITE_TEMP_PEAK_GB} GB): the errors above may be a full disk", red=True)


def module_temp(request, name: str) -> Path:
    """A folder for a module-scoped fixture (``request`` is the fixture's): removed when the module's tests are done
    unless one of them failed, as pyproject's ``tmp_path_retention_policy = "failed"`` does for a test's
    ``tmp_path``, so one file's training runs do not pile up beside the next file's."""
    failed_before = request.session.testsfailed
    folder = request.getfixturevalue("tmp_path_factory").mktemp(name)

    def tidy() -> None:
        if request.session.testsfailed == failed_before:
            shutil.rmtree(folder, ignore_errors=True)

    request.addfinalizer(tidy)
    return folder


# -- detectron2 -----------------------------------------------------------------------------------
D2_TOY_CFG = Path(config_path("toy/faster_rcnn_lrpet_toy.yaml"))
D2_MAX_ITER, D2_INTERVAL = 5, 2
# Tiny and reproducible: every RPN anchor / ROI candidate is sampled, so the sampling RNG only
# permutes them; no flip; few proposals; evaluation keeps low scores so there are detections.
D2_TINY = [
    "MODEL.DEVICE", "cpu", "INPUT.RANDOM_FLIP", "none",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "4096", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "16", "MODEL.RPN.POST_NMS_TOPK_TEST", "16",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "SOLVER.MAX_ITER", str(D2_MAX_ITER), "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
    "LRPET.INTERVAL", str(D2_INTERVAL), "TEST.PRECISE_BN.NUM_ITER", "2",
]


def macs_cut(text: str, part: str = "backbone") -> float:
    """The MACs cut (%) of ``part`` in the table both compression tools print."""
    import re

    m = re.search(rf"^{part} .* ([\d.]+)%\s+([\d.]+)%$", text, re.M)
    assert m, f"no {part} row in the compression tool's output"
    return float(m.group(2))


def run_tool(args, env_extra=None, timeout=420) -> str:
    """Run a Python tool of this repository; assert it succeeded; return its stdout + stderr."""
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def d2_train_cmd(out, *extra):
    """The ``tools/train_det.py`` command line of the toy run writing to ``out``."""
    return ["tools/train_det.py", "--config", str(D2_TOY_CFG), *extra, *D2_TINY, "OUTPUT_DIR", str(out)]


def d2_train(toy_voc, out, *extra) -> str:
    return run_tool(d2_train_cmd(out, *extra), {"LRPET_TOY_VOC": toy_voc})


@pytest.fixture(scope="session")
def d2_toy_voc(tmp_path_factory) -> str:
    from lrpet_dense.data.toy_voc import make_toy_voc

    devkit = make_toy_voc(str(tmp_path_factory.mktemp("voc")), num_train=1, num_test=2, size=128)
    # One training image, listed twice: detectron2's VOC loader (np.loadtxt) needs >= 2 lines, and
    # every batch of 2 is then the same. detectron2's TrainingSampler restarts its index stream on
    # resume, so only a data stream that does not depend on the position lets a resumed run see
    # the data the uninterrupted one saw (see lrpet_dense/detectron2/checkpoint.py).
    main = Path(devkit) / "VOC2007" / "ImageSets" / "Main"
    for split in ("train", "trainval"):
        image_id = (main / f"{split}.txt").read_text().split()[0]
        (main / f"{split}.txt").write_text(f"{image_id}\n{image_id}\n")
    return devkit


@pytest.fixture(scope="session")
def d2_run(d2_toy_voc, tmp_path_factory):
    """One uninterrupted LRPET training run (5 steps, projections at 2, 4, 5, evaluation at the end)."""
    pytest.importorskip("detectron2")
    out = tmp_path_factory.mktemp("d2_run")
    return out, d2_train(d2_toy_voc, out)


@pytest.fixture(scope="session")
def d2_small_ckpts(tmp_path_factory):
    """``(compressed, dense)``: a projected dense checkpoint of the toy config (fresh weights, res3 only,
    no training; its hook state carries the plan) and its compressed checkpoint. Fast."""
    pytest.importorskip("detectron2")
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from lrpet_dense.core import project_
    from lrpet_dense.detectron2 import LRPETHook, add_lrpet_config, compress_model_, save_compressed

    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(D2_TOY_CFG))
    cfg.merge_from_list(D2_TINY + ["LRPET.INCLUDE", ["backbone.res3.*"], "LRPET.TARGET_MACS_CUT", 0.0,
                                   "LRPET.RATIO", 0.5])
    torch.manual_seed(0)  # reproducible weights; the export check must hold for any (tested over 40 seeds)
    model = build_model(cfg)
    hook = LRPETHook.from_config(cfg, model)
    project_(hook.layers, hook.plan)
    folder = tmp_path_factory.mktemp("d2_ckpt")
    dense = folder / "model_final.pth"
    torch.save({"model": model.state_dict(), "trainer": {"hooks": {"LRPETHook": hook.state_dict()}}}, dense)
    compress_model_(model, hook.plan)
    path = folder / "compressed.pth"
    save_compressed(model, str(path))
    return path, dense


# -- mmseg ----------------------------------------------------------------------------------------
SEG_TOY_CFG = Path(config_path("toy/pspnet_r50-d8_lrpet_toy.py"))


def mmseg_tools() -> Path:
    import mmseg

    return Path(mmseg.__file__).parent / ".mim" / "tools"


def seg_env(data_root: Path) -> dict:
    env = dict(os.environ, LRPET_TOY_VOC_ROOT=str(data_root))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="session")
def seg_toy_data(tmp_path_factory) -> Path:
    from lrpet_dense.data.toy_voc import make_toy_voc

    root = tmp_path_factory.mktemp("toy_voc")
    make_toy_voc(str(root), num_train=6, num_test=3, size=96)
    return root


@pytest.fixture(scope="session")
def seg_run(seg_toy_data, tmp_path_factory) -> Path:
    """mmseg's own tools/train.py on the toy config, unchanged: 3 iterations, projections at 2 and 3."""
    pytest.importorskip("mmseg")
    wd = tmp_path_factory.mktemp("train")
    proc = subprocess.run([sys.executable, str(mmseg_tools() / "train.py"), str(SEG_TOY_CFG), "--work-dir", str(wd)],
                          env=seg_env(seg_toy_data), cwd=wd, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"mmseg training failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return wd


@pytest.fixture(scope="session")
def seg_small_ckpts(tmp_path_factory):
    """``(compressed, dense)``: a projected dense checkpoint of the toy config (fresh weights, stem and
    layer1 only, no training; ``checkpoint['lrpet']`` carries the plan) and its compressed checkpoint."""
    pytest.importorskip("mmseg")
    import torch
    from unittest import mock

    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from lrpet_dense.core import LRPETConfig, project_
    from lrpet_dense.mmseg import build_plan, compress_model_, pair_convs, save_compressed

    folder = tmp_path_factory.mktemp("seg_ckpt")
    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(folder)}):
        cfg = Config.fromfile(str(SEG_TOY_CFG))
    init_default_scope("mmseg")
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    config = LRPETConfig(ratio=0.5, include=("backbone.stem.*", "backbone.layer1.*"))
    pairs = pair_convs(model, config).layers
    plan = build_plan(model, pairs, config)
    project_(pairs, plan)
    dense = folder / "iter_3.pth"
    torch.save({"meta": {}, "state_dict": model.state_dict(), "lrpet": {"plan": plan.to_dict()}}, dense)
    compress_model_(model, plan)
    path = folder / "compressed.pth"
    save_compressed(model, str(path))
    return path, dense
