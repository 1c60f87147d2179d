"""Bad input in both frameworks, and safe loading: each mistake is a clear error naming the cause
and the fix, raised before any weight is changed.

detectron2 goes through ``cfg.LRPET`` keys / ``LRPETHook.from_config``, ``DetectionCheckpointer``
(what ``DefaultPredictor`` and ``--eval-only`` use), ``tools/train_det.py`` and
``tools/compress_det.py``; mmseg through ``LRPETHook`` arguments and ``before_train``,
``mmseg.apis.init_model`` and ``tools/compress_seg.py``. Compressed checkpoints are made
in-process (projection + factorisation of a freshly built toy model, ``conftest``), without training.
"""
from __future__ import annotations

import copy
import os
import pickle
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from conftest import D2_TINY, D2_TOY_CFG, REPO, SEG_TOY_CFG

from lrpet_dense.io import load_checkpoint_safe
from lrpet_dense.configs import config_path  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _tool(name):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "tools"))


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys(), "the model's layers changed"
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


class _Evil:
    """Unpickling this would create a file: what an untrusted checkpoint could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# =============================================================================== detectron2
@pytest.fixture(scope="module")
def d2():
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg

    from lrpet_dense.detectron2 import add_lrpet_config

    def cfg(*opts, config=D2_TOY_CFG):
        c = get_cfg()
        add_lrpet_config(c)
        c.merge_from_file(str(config))
        c.merge_from_list(D2_TINY + list(opts))
        return c
    return cfg


@pytest.fixture(scope="module")
def d2_model(d2):
    from detectron2.modeling import build_model

    return build_model(d2())


@pytest.fixture(scope="module")
def d2_compressed(d2_small_ckpts):
    """``(compressed, dense)`` detectron2 checkpoints (``conftest.d2_small_ckpts``)."""
    return d2_small_ckpts


@pytest.mark.parametrize("opts, match", [
    (["LRPET.RATIO", 1.0], r"cfg\.LRPET\.RATIO must lie in \[0, 1\) .*got 1\.0; fix it in the config file"),
    (["LRPET.RATIO", -0.1], r"cfg\.LRPET\.RATIO must .*got -0\.1"),
    (["LRPET.TARGET_MACS_CUT", 1.5], r"cfg\.LRPET\.TARGET_MACS_CUT must lie in \(0, 1\) .*got 1\.5"),
    (["LRPET.TARGET_MACS_CUT", 0.99], r"target_macs_cut=0\.9900 cannot be reached.*Lower the target"),
    (["LRPET.TARGET_MACS_CUT", 0.3, "LRPET.RATIO", 0.5], r"give one of ratio \(0\.5\), target_macs_cut \(0\.3\), not several"),
    (["LRPET.INCLUDE", ["backbone.nothing*"]], r"include pattern 'backbone\.nothing\*' matches no candidate.*Fix"),
    (["LRPET.INTERVAL", 0], r"cfg\.LRPET\.INTERVAL must be an integer >= 1 .*got 0"),
    (["LRPET.INTERVAL", -5], r"cfg\.LRPET\.INTERVAL must be an integer >= 1 .*got -5"),
    (["LRPET.RIDGE", -1e-3], r"cfg\.LRPET\.RIDGE \(lambda\) must be a finite number >= 0, got -0\.001"),
    (["LRPET.RESIDUAL", 2.0], r"cfg\.LRPET\.RESIDUAL must lie in \[0, 1\]"),
    (["LRPET.ON_ERROR", "ignore"], r"cfg\.LRPET\.ON_ERROR must be one of \('raise', 'skip'\).*got 'ignore'"),
    (["LRPET.OVERRIDES", ["backbone.res3.*", 1.2]], r"cfg\.LRPET\.OVERRIDES\['backbone\.res3\.\*'\] must be"),
    (["LRPET.RANK_POLICY", "greedy"], r"cfg\.LRPET\.RANK_POLICY must be one of \('uniform', 'energy'\)"),
])
def test_d2_bad_lrpet_keys(d2, d2_model, opts, match):
    from lrpet_dense.detectron2 import LRPETHook

    cfg = d2()
    for key, value in zip(opts[::2], opts[1::2]):  # as merge_from_list would, without its type coercion
        cfg.LRPET[key.split(".")[1]] = value
    before = _snapshot(d2_model)
    with pytest.raises(ValueError, match=match):
        LRPETHook.from_config(cfg, d2_model)
    _assert_unchanged(d2_model, before)


class _OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        from detectron2.layers import Conv2d
        self.backbone = nn.Module()
        self.backbone.conv = Conv2d(3, 8, 3, bias=False, norm=nn.BatchNorm2d(8))
        self.backbone.dw = Conv2d(8, 8, 3, groups=8, bias=False, norm=nn.BatchNorm2d(8))
        self.backbone.odd = Conv2d(8, 16, 1, bias=False, norm=nn.BatchNorm2d(12))


@pytest.mark.parametrize("include, match", [
    (["backbone.dw"], r"include pattern 'backbone\.dw' selects only grouped/depthwise convs .*groups=8.*"
                      r"Remove the pattern"),
    (["backbone.odd"], r"layer 'backbone\.odd': its BatchNorm BatchNorm2d has 12 channels but the conv has 16 output "
                       r"channels; fix the model, or leave the layer out with exclude"),
    (["backbone.*"], r"'backbone\.odd'.*12 channels"),
])
def test_d2_grouped_conv_and_bn_width(d2, include, match):
    from lrpet_dense.detectron2 import LRPETHook

    model = _OddModel()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        LRPETHook.from_config(d2("LRPET.INCLUDE", include), model)
    _assert_unchanged(model, before)


def test_d2_compressed_plan_not_matching_config(d2, d2_compressed):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    path, _ = d2_compressed
    fpn = d2("MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "BN", config=Path(config_path("faster_rcnn_fpn_lrpet.yaml")))
    model = build_model(fpn)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="the compressed checkpoint does not match this model/config"):
        DetectionCheckpointer(model).load(str(path))
    _assert_unchanged(model, before)  # no layer was swapped, no weight copied
    fpn.MODEL.WEIGHTS = str(path)
    with pytest.raises(ValueError, match="does not match this model/config"):
        DefaultPredictor(fpn)


def test_d2_dense_checkpoint_loaded_as_compressed_and_back(d2, d2_compressed, tmp_path, capsys):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from lrpet_dense.core import FactorizedConv2d

    path, dense = d2_compressed
    model = build_model(d2())
    DetectionCheckpointer(model).load(str(path))  # the plan in the checkpoint decides, not the config
    assert any(isinstance(m, FactorizedConv2d) for m in model.modules())
    before = _snapshot(model)
    with pytest.raises(ValueError, match="the checkpoint is dense .*build a fresh model from the config"):
        DetectionCheckpointer(model).load(str(dense))
    _assert_unchanged(model, before)
    # a compressed checkpoint given to the compression tool as if it were dense
    out = tmp_path / "again.pth"
    assert _tool("compress_det").main(["--config", str(D2_TOY_CFG), "--checkpoint", str(path), "--output", str(out),
                                       "--no-flops", *D2_TINY]) == 2
    assert re.search("error: .*is already compressed .*give the dense training checkpoint", capsys.readouterr().err)
    assert not out.exists()


def test_d2_missing_or_truncated_checkpoint(d2_compressed, tmp_path, capsys):
    compress_det, train_det = _tool("compress_det"), _tool("train_det")
    _, dense = d2_compressed
    truncated = _truncate(dense, tmp_path / "truncated.pth")
    out = tmp_path / "out.pth"
    for bad, exc, match in ((tmp_path / "missing.pth", FileNotFoundError, "does not exist; check the path"),
                            (truncated, ValueError, "is truncated or not a torch checkpoint")):
        assert compress_det.main(["--config", str(D2_TOY_CFG), "--checkpoint", str(bad), "--output", str(out),
                                  "--no-flops", *D2_TINY]) == 2
        assert re.search("error: .*" + re.escape(repr(str(bad))) + ".*" + match, capsys.readouterr().err)
        args = train_det.get_parser().parse_args(["--config", str(D2_TOY_CFG), "--eval-only", *D2_TINY,
                                                  "MODEL.WEIGHTS", str(bad), "OUTPUT_DIR", str(tmp_path / "eval")])
        with pytest.raises(exc, match=match):
            train_det.main(args)
    assert not out.exists()


# =============================================================================== mmseg
class _SegNet(nn.Module):
    """An mmseg-style segmentor: ``backbone = Sequential(conv, bn, ...)`` (what ResNetV1c's stem is)."""

    def __init__(self, grouped: bool = False, bn_width: int = 16):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                      nn.Conv2d(16, 16, 3, padding=1, bias=False, groups=4 if grouped else 1),
                                      nn.BatchNorm2d(16),
                                      nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(bn_width))


def _before_train(hook, model):
    runner = mock.MagicMock()
    runner.model = model
    hook.before_train(runner)
    return runner


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=-0.1), r"ratio must lie in \[0, 1\) .*got -0\.1"),
    (dict(ratio=1.5), r"ratio must lie in \[0, 1\) .*got 1\.5"),
    (dict(ratio=0.5, interval=-1), r"interval must be an integer >= 1 .*got -1"),
    (dict(ratio=0.5, ridge=-1e-3), r"ridge \(lambda\) must be a finite number >= 0, got -0\.001"),
    (dict(ratio=0.5, on_error="ignore"), r"on_error must be one of \('raise', 'skip'\).*got 'ignore'"),
])
def test_seg_bad_hook_arguments(kwargs, match):
    pytest.importorskip("mmseg")
    from lrpet_dense.mmseg import LRPETHook

    with pytest.raises(ValueError, match="LRPETHook: " + match):
        LRPETHook(**kwargs)


@pytest.mark.parametrize("model_kw, hook_kw, match", [
    (dict(), dict(target_macs_cut=0.99), r"target_macs_cut=0\.9900 cannot be reached.*Lower the target"),
    (dict(), dict(ratio=0.5, include=["backbone.7*"]), r"include pattern 'backbone\.7\*' matches no candidate"),
    (dict(grouped=True), dict(ratio=0.5, include=["backbone.2"]),
     r"include pattern 'backbone\.2' selects only grouped/depthwise convs .*groups=4"),
    (dict(bn_width=12), dict(ratio=0.5),
     r"layer 'backbone\.4': its BatchNorm BatchNorm2d has 12 channels but the conv has 16 output channels; "
     r"fix the model, or leave the layer out with exclude"),
])
def test_seg_bad_selection_before_training(model_kw, hook_kw, match):
    pytest.importorskip("mmseg")
    from lrpet_dense.mmseg import LRPETHook

    model = _SegNet(**model_kw)
    before = _snapshot(model)
    hook = LRPETHook(interval=2, plan_input_size=(8, 8), **hook_kw)
    with pytest.raises(ValueError, match=match):
        _before_train(hook, model)
    _assert_unchanged(model, before)


def test_seg_grouped_conv_under_a_broad_pattern_is_left_out():
    pytest.importorskip("mmseg")
    from lrpet_dense.mmseg import LRPETHook

    hook = LRPETHook(ratio=0.5, interval=2, plan_input_size=(8, 8))
    _before_train(hook, _SegNet(grouped=True))
    # backbone.4 (16 -> 16, 1x1) is selected but left dense at p = 0.5: rank 8 would not save MACs
    assert [l.name for l in hook.layers] == ["backbone.0"] and hook.plan.left_dense == ["backbone.4"]


@pytest.fixture(scope="module")
def seg_cfg(seg_small_ckpts):
    from mmengine.config import Config

    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(seg_small_ckpts[0].parent)}):
        return Config.fromfile(str(SEG_TOY_CFG))


@pytest.fixture(scope="module")
def seg_compressed(seg_small_ckpts):
    """``(compressed, dense)`` mmseg checkpoints (``conftest.seg_small_ckpts``)."""
    return seg_small_ckpts


def test_seg_compressed_plan_not_matching_config(seg_cfg, seg_compressed):
    from mmengine.registry import init_default_scope
    from mmseg.apis import init_model
    from mmseg.registry import MODELS

    path, _ = seg_compressed
    cfg = copy.deepcopy(seg_cfg)
    cfg.model.backbone.stem_channels = 32  # another model: the plan's stem shapes do not fit it
    with pytest.raises(ValueError, match=r"the compressed checkpoint does not match this model/config: "
                                         r"layer 'backbone\.stem\.0'.*Load it with the config it was compressed with"):
        init_model(cfg, str(path), device="cpu")
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="does not match this model/config"):
        model.load_state_dict(load_checkpoint_safe(str(path))["state_dict"])
    _assert_unchanged(model, before)


def test_seg_dense_checkpoint_loaded_as_compressed_and_back(seg_cfg, seg_compressed, tmp_path, capsys):
    from mmseg.apis import init_model

    path, dense = seg_compressed
    fact = init_model(copy.deepcopy(seg_cfg), str(path), device="cpu")
    before = _snapshot(fact)
    with pytest.raises(ValueError, match="the checkpoint is dense .*build a fresh model from the config"):
        fact.load_state_dict(load_checkpoint_safe(str(dense))["state_dict"])
    _assert_unchanged(fact, before)
    out = tmp_path / "again.pth"
    assert _tool("compress_seg").main([str(SEG_TOY_CFG), str(path), str(out)]) == 2
    assert "is already compressed (factorised); give the dense training checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_seg_missing_or_truncated_checkpoint(seg_compressed, tmp_path, capsys):
    compress_seg = _tool("compress_seg")
    _, dense = seg_compressed
    truncated = _truncate(dense, tmp_path / "truncated.pth")
    out = tmp_path / "out.pth"
    assert compress_seg.main([str(SEG_TOY_CFG), str(tmp_path / "missing.pth"), str(out)]) == 2
    assert re.search(r"error: .*missing\.pth' does not exist; check the path", capsys.readouterr().err)
    assert compress_seg.main([str(SEG_TOY_CFG), str(truncated), str(out)]) == 2
    assert re.search(r"error: .*truncated\.pth' is truncated or not a torch checkpoint", capsys.readouterr().err)
    assert not out.exists()


# =============================================================================== security
def test_compressed_checkpoints_load_weights_only(d2_compressed, seg_compressed):
    """Plain data and tensors only: ``torch.load(weights_only=True)`` loads them, plan included."""
    from lrpet_dense.core import RankPlan

    d2_ckpt = torch.load(str(d2_compressed[0]), map_location="cpu", weights_only=True)
    assert RankPlan.from_dict(d2_ckpt["lrpet_plan"]).ranks
    seg_ckpt = torch.load(str(seg_compressed[0]), map_location="cpu", weights_only=True)
    assert RankPlan.from_dict(seg_ckpt["meta"]["lrpet_plan"]).ranks
    assert seg_ckpt["state_dict"]._metadata[""]["lrpet_plan"] == seg_ckpt["meta"]["lrpet_plan"]


def test_hook_state_loads_weights_only(d2, tmp_path):
    """The hooks' checkpoint state (plan, counters) is plain data, in both frameworks."""
    pytest.importorskip("mmseg")
    from detectron2.layers import Conv2d

    from lrpet_dense.core import LRPETConfig, RankPlan, build_rank_plan
    from lrpet_dense.core.selection import layer_specs
    from lrpet_dense.detectron2 import LRPETHook, pair_convs
    from lrpet_dense.mmseg import LRPETHook as SegHook

    model = nn.Sequential(Conv2d(3, 8, 3, bias=False, norm=nn.BatchNorm2d(8)), Conv2d(8, 8, 3, norm=nn.BatchNorm2d(8)))
    layers = pair_convs(model, LRPETConfig(include=("*",))).layers
    plan = build_rank_plan(layer_specs(layers, {l.name: (4, 4) for l in layers}), LRPETConfig(ratio=0.5))
    hook = LRPETHook(model, LRPETConfig(interval=2), layers=layers, plan=plan)
    hook.projector.last_iter, hook.projector.num_projections = 4, 2
    torch.save(hook.state_dict(), tmp_path / "d2.pth")
    fresh = LRPETHook(model, LRPETConfig(interval=2), layers=layers, plan=plan)
    fresh.load_state_dict(torch.load(tmp_path / "d2.pth", weights_only=True))
    assert fresh.projector.state_dict() == {"last_iter": 4, "num_projections": 2}

    seg = SegHook(ratio=0.5, interval=2, plan_input_size=(8, 8))
    _before_train(seg, _SegNet())
    seg.projector.last_iter, seg.projector.num_projections = 2, 1
    ckpt = {"meta": {}, "state_dict": {}}
    seg.before_save_checkpoint(None, ckpt)
    torch.save(ckpt, tmp_path / "seg.pth")
    fresh = SegHook(ratio=0.5, interval=2)
    fresh.after_load_checkpoint(mock.MagicMock(), torch.load(tmp_path / "seg.pth", weights_only=True))
    assert RankPlan.from_dict(fresh.resumed_state["plan"]).ranks == seg.plan.ranks
    assert fresh.resumed_state["projector"]["last_iter"] == 2


def test_rng_state_loads_weights_only_and_restores(d2, tmp_path):
    """``RNGStateHook``'s checkpoint state is plain data and puts the RNG streams back exactly."""
    import random

    import numpy as np

    from lrpet_dense.detectron2 import RNGStateHook
    from lrpet_dense.rng import restore_rng_state

    hook = RNGStateHook(period=2, max_iter=4)
    state = hook.state_dict()
    torch.save(state, tmp_path / "rng.pth")
    loaded = torch.load(tmp_path / "rng.pth", weights_only=True)
    expected = (torch.rand(4), np.random.rand(4), random.random())  # the draws right after the capture
    torch.rand(100), np.random.rand(100), random.random()
    restore_rng_state(loaded["states"][0])
    got = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_untrusted_pickle_is_refused_and_not_run(d2, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.ones(1)}, "payload": _Evil(str(marker))}, evil)
    with pytest.raises(ValueError, match="cannot load checkpoint .*evil.pth.* safely \\(weights_only=True\\)"):
        load_checkpoint_safe(str(evil))
    assert _tool("compress_det").main(["--config", str(D2_TOY_CFG), "--checkpoint", str(evil), "--output",
                                       str(tmp_path / "out.pth"), "--no-flops", *D2_TINY]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "safely" in errors[0] and "it needs io.open" in errors[0]  # one line, naming it
    assert not marker.exists()
    # a plain unpickler would have run it: weights_only=True is what protects
    pickle.loads(pickle.dumps(_Evil(str(marker)))).close()
    assert marker.exists()


def test_no_arbitrary_object_loading_in_our_code():
    """No ``weights_only=False`` (or pickle.load) anywhere in the package or the tools."""
    files = list((REPO / "lrpet_dense").rglob("*.py")) + list((REPO / "tools").glob("*.py"))
    offenders = [str(f.relative_to(REPO)) for f in files
                 if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(", f.read_text())]
    assert not offenders, offenders
