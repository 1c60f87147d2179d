"""Bad input caught early and said clearly (issue 24): LRPET options checked before any model, data loader
or output file is built (our CLI: one ``error:`` line, exit status 2; detectron2's own entry points: a
``ValueError`` at config time); a LazyConfig given to a yacs command; long key lists summarised; and
extreme rank plans warned about once, in every framework and the plain route."""
from __future__ import annotations

import importlib.util
import logging
import os
import re
from unittest import mock

import pytest
import torch
from torch import nn

from conftest import D2_TINY, D2_TOY_CFG, REPO, SEG_TOY_CFG

from lrpet_dense.core import LRPETConfig

pytestmark = pytest.mark.timeout(300)
LAZY_CFG = "toy/faster_rcnn_fpn_lrpet_lazy.py"


@pytest.fixture(autouse=True)
def _loggers_restored():
    """detectron2's ``setup_logger`` (which the commands call) stops ``lrpet_dense`` from propagating and adds
    handlers: undo it, so other tests' log capture is not affected."""
    saved = {n: (logging.getLogger(n).propagate, list(logging.getLogger(n).handlers), logging.getLogger(n).level)
             for n in ("lrpet_dense", "detectron2", "fvcore")}
    yield
    for n, (propagate, handlers, level) in saved.items():
        log = logging.getLogger(n)
        log.propagate, log.handlers[:], log.level = propagate, handlers, level


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        if record.getMessage().startswith("LRPET: an extreme rank plan"):
            self.messages.append(record.getMessage())


@pytest.fixture
def plan_warnings():
    """The extreme-plan warnings logged under ``lrpet_dense`` (a handler on that logger: whatever propagates)."""
    records = _Records()
    log = logging.getLogger("lrpet_dense")
    log.addHandler(records)
    yield records.messages
    log.removeHandler(records)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err[-3000:]  # (the exit status 2 says no exception escaped)
    return lines[0]


def _cli(argv):
    from lrpet_dense.cli import main

    return main([str(a) for a in argv])


# ============================================================================ options checked first
def test_train_det_with_an_lrpet_option_out_of_range_builds_and_writes_nothing(tmp_path, capsys):
    """``lrpet-dense train-det ... LRPET.RATIO 1.5``: one error line naming the key, the value and the range,
    exit status 2, before detectron2's launch (no model, no data loader, no config.yaml / log.txt)."""
    pytest.importorskip("detectron2")
    import lrpet_dense.cli.train_det as train_det

    out = tmp_path / "out"
    for opts, match in ((["LRPET.RATIO", "1.5"], r"cfg\.LRPET\.RATIO must lie in \[0, 1\) .*got 1\.5"),
                        (["LRPET.RATI", "0.5"], r"Non-existent (config )?key: LRPET\.RATI")):
        with mock.patch.object(train_det, "launch", side_effect=AssertionError("launched")):
            assert _cli(["train-det", "--config", D2_TOY_CFG, *D2_TINY, *opts, "OUTPUT_DIR", out]) == 2
        line = _one_error_line(capsys)
        assert re.search(match, line), line
        assert not out.exists()


@pytest.mark.parametrize("command", ["compress", "export", "report", "search"])
def test_det_commands_check_lrpet_options_before_anything(command, tmp_path, capsys):
    pytest.importorskip("detectron2")
    out = tmp_path / "out"
    argv = {"compress": ["--checkpoint", tmp_path / "missing.pth", "--output", out],
            "export": ["--checkpoint", tmp_path / "missing.pth", "--output", out],
            "report": ["--checkpoint", tmp_path / "missing.pth", "--compressed", tmp_path / "c.pth", "--out", out],
            "search": ["--out", out]}[command]
    with mock.patch("detectron2.modeling.build_model", side_effect=AssertionError("a model was built")):
        assert _cli([command, "det", "--config", D2_TOY_CFG, *argv, *D2_TINY, "LRPET.TARGET_MACS_CUT", "1.5"]) == 2
    line = _one_error_line(capsys)
    assert "cfg.LRPET.TARGET_MACS_CUT must lie in (0, 1)" in line and "got 1.5" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["compress", "export", "report", "search"])
def test_seg_commands_check_lrpet_hook_options_before_anything(command, tmp_path, capsys, monkeypatch):
    pytest.importorskip("mmseg")
    monkeypatch.setenv("LRPET_TOY_VOC_ROOT", str(tmp_path))
    out = tmp_path / "out"
    argv = {"compress": [tmp_path / "missing.pth", out], "export": [tmp_path / "missing.pth", out],
            "report": [tmp_path / "missing.pth", tmp_path / "c.pth", "--out", out], "search": ["--out", out]}[command]
    assert _cli([command, "seg", SEG_TOY_CFG, *argv, "--cfg-options", "custom_hooks.0.target_macs_cut=1.5"]) == 2
    line = _one_error_line(capsys)
    assert "LRPETHook: target_macs_cut must lie in (0, 1)" in line and "got 1.5" in line
    assert not out.exists()


def test_lrpet_trainer_checks_the_options_before_building_anything():
    """detectron2's own entry (``DefaultTrainer`` subclasses: ``LRPETTrainer``): a clear exception at config time."""
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg

    from lrpet_dense.detectron2 import LRPETTrainer, add_lrpet_config

    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(D2_TOY_CFG))
    cfg.merge_from_list(D2_TINY + ["LRPET.ENABLED", True, "LRPET.RATIO", 1.5])
    with mock.patch.object(LRPETTrainer, "build_model", side_effect=AssertionError("a model was built")), \
            pytest.raises(ValueError, match=r"cfg\.LRPET\.RATIO must lie in \[0, 1\) .*got 1\.5"):
        LRPETTrainer(cfg)
    with mock.patch.object(LRPETTrainer, "build_model", side_effect=AssertionError("a model was built")), \
            pytest.raises(ValueError, match=r"no LRPET keys: call lrpet_dense\.detectron2\.add_lrpet_config\(cfg\)"):
        LRPETTrainer(get_cfg())


def _lazy_script():
    spec = importlib.util.spec_from_file_location("lazy_train", REPO / "examples" / "detectron2_lazyconfig_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lazyconfig_script_checks_the_options_before_building_anything(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.engine import default_argument_parser

    from lrpet_dense.configs import config_path

    script = _lazy_script()
    out = tmp_path / "out"
    args = default_argument_parser().parse_args(["--config-file", config_path(LAZY_CFG), "lrpet.ratio=1.5",
                                                 f"train.output_dir={out}"])
    with mock.patch.object(script, "instantiate", side_effect=AssertionError("something was built")), \
            pytest.raises(ValueError, match=r"lrpet\.ratio must lie in \[0, 1\) .*got 1\.5"):
        script.main(args)
    assert not out.exists()


def test_new_options_are_checked():
    for kwargs, match in (({"warn_energy_below": 1.0}, r"warn_energy_below must lie in \[0, 1\).*got 1\.0"),
                          ({"warn_energy_below": -0.1}, r"warn_energy_below must .*got -0\.1"),
                          ({"warn_rank_below": -1}, r"warn_rank_below must be an integer >= 0 .*got -1"),
                          ({"warn_rank_below": 2.5}, r"warn_rank_below must be an integer >= 0 .*got 2\.5")):
        with pytest.raises(ValueError, match=match):
            LRPETConfig(**kwargs)


# ============================================================================ a LazyConfig to a yacs command
@pytest.mark.parametrize("argv", [["train-det", "--config", LAZY_CFG],
                                  ["compress", "det", "--config", LAZY_CFG, "--checkpoint", "x.pth", "--output", "y"],
                                  ["export", "det", "--config", LAZY_CFG, "--checkpoint", "x.pth", "--output", "y"]])
def test_a_lazyconfig_given_to_a_yacs_command_says_what_to_do(argv, tmp_path, capsys, monkeypatch):
    pytest.importorskip("detectron2")
    monkeypatch.chdir(tmp_path)
    assert _cli(argv) == 2
    line = _one_error_line(capsys)
    assert "is a detectron2 LazyConfig" in line and "read yacs configs (.yaml)" in line
    assert "examples/detectron2_lazyconfig_train.py" in line and "docs/detectron2.md" in line
    assert not os.listdir(tmp_path)


def test_an_mmseg_config_given_to_a_det_command_names_the_seg_commands(capsys):
    pytest.importorskip("detectron2")
    assert _cli(["export", "det", "--config", SEG_TOY_CFG, "--checkpoint", "x.pth", "--output", "y"]) == 2
    assert "an mmseg config goes to the 'seg' commands" in _one_error_line(capsys)


# ============================================================================ long key lists summarised
def test_a_detectron2_checkpoint_given_to_compress_seg_is_a_short_error(tmp_path, capsys, monkeypatch):
    """Every missing key used to be listed (10.6 KB); now counts, the first names and what it likely is."""
    pytest.importorskip("detectron2")
    pytest.importorskip("mmseg")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from lrpet_dense.detectron2 import add_lrpet_config

    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(D2_TOY_CFG))
    state = build_model(cfg).state_dict()
    bare, trained = tmp_path / "state.pth", tmp_path / "model_final.pth"
    torch.save(state, bare)
    torch.save({"model": state, "iteration": 3}, trained)
    monkeypatch.setenv("LRPET_TOY_VOC_ROOT", str(tmp_path))
    out = tmp_path / "out.pth"
    assert _cli(["compress", "seg", SEG_TOY_CFG, bare, out]) == 2
    line = _one_error_line(capsys)
    assert len(line) < 1000, len(line)
    assert re.search(r"\d+ of the model's \d+ keys are missing from it \('backbone\.", line)
    assert f"{len(state)} of its keys are not in the model" in line and "shares no key with the model" in line
    assert _cli(["compress", "seg", SEG_TOY_CFG, trained, out]) == 2
    line = _one_error_line(capsys)
    assert "no 'state_dict' entry; it has 'model', 'iteration'" in line and "detectron2" in line
    assert not out.exists()


def test_summarized_load_error_keeps_counts_names_and_shapes():
    from lrpet_dense.core.adapter import summarize_load_error, summarize_names

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(4, 4))
    state = {f"extra.{i}": torch.zeros(1) for i in range(50)}
    state["0.weight"] = torch.zeros(4, 3, 3, 3)
    with pytest.raises(RuntimeError) as e:
        model.load_state_dict(state)
    text = summarize_load_error(str(e.value), len(model.state_dict()), 1)
    assert "3 of the model's 4 keys are missing from it ('0.bias', '1.weight', '1.bias')" in text
    assert "50 of its keys are not in the model ('extra.0', 'extra.1', 'extra.2', ...)" in text
    assert "1 keys have another shape ('0.weight' torch.Size([4, 3, 3, 3]) in the checkpoint, torch.Size([8, 3, 3, " \
           "3]) in the model)" in text
    assert "shares no key" not in text and len(text) < 600
    assert summarize_names(["a", "b"]) == "'a', 'b'" and summarize_names(list("abcdef")) == "6: 'a', 'b', 'c', ..."


# ============================================================================ extreme plans warned about once
def _plain_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 128, 1), nn.BatchNorm2d(128))


def test_plain_extreme_plan_is_warned_about_once_with_the_projection_s_own_figures(plan_warnings):
    import lrpet_dense as lrpet

    model, x = _plain_net(), torch.randn(2, 3, 16, 16)
    session = lrpet.prepare(model, x, LRPETConfig(ratio=0.99, interval=1), total_steps=3)
    assert len(plan_warnings) == 1
    text = plan_warnings[0]
    assert "an extreme rank plan (p=0.99)" in text and "warn_energy_below=0 and warn_rank_below=0" in text
    assert "LRPET.WARN_ENERGY_BELOW 0.0" in text and "random initialisation it says little" in text
    assert "3 of the 3 planned convs get a rank below 4 (warn_rank_below)" in text
    least = float(re.search(r"planned convs: '\d+' ([\d.]+)%", text).group(1))
    summary = session.step()  # the first projection, on the weights the plan was made from
    assert least == pytest.approx(100 * summary.scalars()["lrpet/energy_kept_min"], abs=0.05)
    session.step()
    session.step()
    assert len(plan_warnings) == 1  # once
    lrpet.prepare(_plain_net(), x, LRPETConfig(ratio=0.99, warn_energy_below=0, warn_rank_below=0))
    lrpet.prepare(_plain_net(), x, LRPETConfig(ratio=0.5))
    assert len(plan_warnings) == 1  # silenced; a usual plan says nothing


def test_a_usual_plan_computes_no_spectrum(plan_warnings):
    """Cheap: the top k of m singular values hold at least k/m of the energy, so no spectrum is computed while
    every rank share k/m is above the threshold (0.1: ratios below about 0.9), and only the convs whose share
    is below it otherwise."""
    import lrpet_dense as lrpet
    from lrpet_dense.core import plancheck

    x = torch.randn(2, 3, 16, 16)
    with mock.patch.object(plancheck, "energy_kept", side_effect=AssertionError("a spectrum was computed")):
        lrpet.prepare(_plain_net(), x, LRPETConfig(ratio=0.85))
    asked = []
    real = plancheck.energy_kept
    with mock.patch.object(plancheck, "energy_kept", side_effect=lambda l, k, c: asked.append((l.name, k)) or
                           real(l, k, c)):
        lrpet.prepare(_plain_net(), x, LRPETConfig(ratio=0.5, overrides={"3": 0.95}))
    assert asked == [("3", 3)]  # conv '3' (64 x 576) at 0.95: rank 3 of 64, share 3/64; the others 32/64, 13/27


def test_detectron2_and_mmseg_warn_about_an_extreme_plan(plan_warnings, tmp_path):
    pytest.importorskip("detectron2")
    pytest.importorskip("mmseg")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import lrpet_dense.mmseg as lm
    from lrpet_dense.detectron2 import LRPETHook, add_lrpet_config

    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(D2_TOY_CFG))
    cfg.merge_from_list(D2_TINY + ["LRPET.INCLUDE", ["backbone.res3.*"], "LRPET.TARGET_MACS_CUT", 0.0,
                                   "LRPET.RATIO", 0.99])
    torch.manual_seed(0)
    model = build_model(cfg)
    LRPETHook.from_config(cfg, model)
    assert len(plan_warnings) == 1 and "'backbone.res3." in plan_warnings[0]
    cfg.merge_from_list(["LRPET.WARN_ENERGY_BELOW", 0.0, "LRPET.WARN_RANK_BELOW", 0])
    LRPETHook.from_config(cfg, model)
    assert len(plan_warnings) == 1

    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(tmp_path)}):
        seg_cfg = Config.fromfile(str(SEG_TOY_CFG))
    init_default_scope("mmseg")
    seg = MODELS.build(seg_cfg.model)
    lm.ADAPTER.session(seg, LRPETConfig(ratio=0.99, include=("backbone.layer1.*",)))
    assert len(plan_warnings) == 2 and "'backbone.layer1." in plan_warnings[1]
    runner = mock.MagicMock()  # the mmseg hook: the warning goes to mmengine's logger (its log file)
    runner.model = seg
    lm.LRPETHook(ratio=0.99, include=["backbone.layer1.*"]).before_train(runner)
    warned = [c.args[0] for c in runner.logger.warning.call_args_list]
    assert len(warned) == 1 and warned[0].startswith("LRPET: an extreme rank plan (p=0.99)")
