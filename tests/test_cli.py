"""The packaged command line and the configs found by name, from any working directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, mmseg_tools, seg_env

pytestmark = pytest.mark.timeout(600)

CLI = Path(sys.executable).parent / "lrpet-dense"


def _run(args, cwd, env=None, timeout=420):
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=dict(os.environ, **(env or {})), capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_console_script_lists_the_subcommands(tmp_path):
    assert CLI.exists(), "the setup installs the lrpet-dense console script into the environment"
    code, text = _run([CLI, "--help"], tmp_path)
    assert code == 0
    for sub in ("train-det", "compress", "report", "config-path"):
        assert sub in text
    import lrpet_dense

    assert _run([CLI, "--version"], tmp_path) == (0, f"lrpet-dense {lrpet_dense.__version__}\n")
    code, text = _run([sys.executable, "-m", "lrpet_dense", "compress", "det", "--help"], tmp_path)
    assert code == 0 and "--project" in text and "--plan-from-config" in text
    for sub in (["compress", "seg"], ["export", "seg"]):  # errors are one line and exit status 2
        code, text = _run([CLI, *sub, "toy/pspnet_r50-d8_lrpet_toy.py", tmp_path / "nope.pth", tmp_path / "x"], tmp_path)
        assert code == 2 and "error: checkpoint" in text and "nope.pth' does not exist" in text, text[-2000:]
    code, text = _run([CLI, "export", "seg", "toy/pspnet_r50-d8_lrpet_toy.py", tmp_path / "nope.pth", tmp_path / "x",
                       "--align-ranks", "0"], tmp_path)
    assert code == 2 and "--align-ranks" in text and "expected an integer >= 1, got '0'" in text, text[-2000:]


def test_config_path_by_name_and_unknown_name(tmp_path):
    from lrpet_dense.configs import config_dir, config_path, list_configs, resolve

    shipped = Path(config_dir())
    for name in ("faster_rcnn_lrpet.yaml", "toy/faster_rcnn_lrpet_quickstart.yaml", "configs/faster_rcnn_lrpet.yaml",
                 "pspnet_r50-d8_lrpet_voc12aug-512x512.py"):
        assert Path(config_path(name)).is_file() and shipped in Path(config_path(name)).parents
    assert "toy/pspnet_r50-d8_lrpet_toy.py" in list_configs()
    code, text = _run([CLI, "config-path", "toy/pspnet_r50-d8_lrpet_toy.py"], tmp_path)
    assert code == 0 and text.strip() == config_path("toy/pspnet_r50-d8_lrpet_toy.py")
    code, text = _run([CLI, "config-path", "faster_rcnn_nope.yaml"], tmp_path)
    assert code == 2 and "faster_rcnn_nope.yaml" in text and "faster_rcnn_lrpet.yaml" in text  # lists the shipped
    # a plain path comes first
    own = tmp_path / "faster_rcnn_lrpet.yaml"
    own.write_text("MODEL: {}\n")
    assert resolve(str(own)) == str(own) and resolve("faster_rcnn_lrpet.yaml") == config_path("faster_rcnn_lrpet.yaml")
    with pytest.raises(FileNotFoundError, match="neither a file nor one of the configs shipped"):
        resolve("../../etc/passwd.yaml")  # never outside the shipped folder


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_documented_detectron2_entry_works_verbatim_from_an_empty_directory(tmp_path):
    """``python <repo>/tools/train_det.py --config faster_rcnn_lrpet.yaml`` from an empty directory: the shipped
    config is found and used; the run gets to the dataset (not there: VOC is not downloaded here)."""
    pytest.importorskip("detectron2")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"DETECTRON2_DATASETS": str(tmp_path / "no_datasets")}
    code, text = _run([sys.executable, REPO / "tools" / "train_det.py", "--config", "faster_rcnn_lrpet.yaml",
                       "MODEL.DEVICE", "cpu", "OUTPUT_DIR", tmp_path / "out"], empty, env)
    shipped = str(Path(REPO / "lrpet_dense" / "configs" / "faster_rcnn_lrpet.yaml"))
    assert code != 0 and f"Contents of args.config_file={shipped}" in text
    assert "VOC2007" in text and "No such file" in text  # stopped at the dataset, past config and model
    code, text = _run([sys.executable, REPO / "tools" / "train_det.py", "--config", "faster_rcnn_nope.yaml"], empty)
    assert code != 0 and "faster_rcnn_nope.yaml" in text and "toy/faster_rcnn_lrpet_toy.yaml" in text
    # the console script hands detectron2's own options over as they are (argparse would refuse "--config")
    code, text = _run([CLI, "train-det", "--config", "faster_rcnn_nope.yaml"], empty)
    assert code != 0 and "unrecognized arguments" not in text and "toy/faster_rcnn_lrpet_toy.yaml" in text
    code, text = _run([CLI, "train-det", "--help"], empty)
    assert code == 0 and "--config-file" in text and "--eval-only" in text


@pytest.mark.slow
def test_mmseg_train_tool_runs_a_shipped_config_found_by_the_path_call(seg_toy_data, tmp_path):
    code, path = _run([CLI, "config-path", "toy/pspnet_r50-d8_lrpet_toy.py"], tmp_path)
    assert code == 0
    code, text = _run([sys.executable, mmseg_tools() / "train.py", path.strip(), "--work-dir", tmp_path / "wd"],
                      tmp_path, seg_env(seg_toy_data))
    assert code == 0, text[-3000:]
    assert "LRPET projection 2 after iteration 3" in text


@pytest.mark.slow
def test_own_mmseg_config_inherits_a_shipped_one(tmp_path, seg_toy_data):
    """mmengine's ``pkg::`` scope is for OpenMMLab packages only; a user's config inherits ours by path, here
    through mmengine's environment-variable substitution, as README shows."""
    pytest.importorskip("mmseg")
    from unittest import mock

    from mmengine.config import Config

    from lrpet_dense.configs import config_dir

    own = tmp_path / "my_pspnet.py"
    own.write_text("_base_ = '{{$LRPET_DENSE_CONFIGS:}}/toy/pspnet_r50-d8_lrpet_toy.py'\n"
                   "custom_hooks = [dict(type='LRPETHook', target_macs_cut=0.3, interval=2)]\n")
    with mock.patch.dict(os.environ, {"LRPET_DENSE_CONFIGS": config_dir(), "LRPET_TOY_VOC_ROOT": str(seg_toy_data)}):
        cfg = Config.fromfile(str(own))
    assert cfg.model.type == "LRPETEncoderDecoder" and cfg.custom_imports.imports == ["lrpet_dense.mmseg"]
    assert cfg.custom_hooks == [dict(type="LRPETHook", target_macs_cut=0.3, interval=2)]
    code, text = _run([CLI, "config-path", "--dir"], tmp_path)
    assert code == 0 and text.strip() == config_dir()
