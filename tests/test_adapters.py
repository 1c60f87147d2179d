"""One adapter contract (``lrpet_dense.core.adapter.Adapter``): each shared behaviour, run against every adapter.

detectron2, mmseg, mmdet and the plain PyTorch adapter must behave alike where the contract says so; a test
here fails as soon as one of them drifts: the public functions' signatures, DDP unwrapping, the
checked compression and its checkpoint round trip, the order in which a checkpoint's plan is found,
the resume check of a saved plan against the model, the warning for a norm that is not a BatchNorm,
the default planning size, and what ``compress --input-size`` changes.
"""
from __future__ import annotations

import copy
import inspect
import os
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch import nn

from conftest import D2_TINY, D2_TOY_CFG, SEG_TOY_CFG

from lrpet_dense.configs import config_path

from lrpet_dense.core import LRPETConfig, LRPETSession, RankPlan, project_
from lrpet_dense.core.adapter import CHECK_HW, Adapter
from lrpet_dense.core.plain import PlainAdapter

FRAMEWORKS = ["detectron2", "mmseg", "mmdet", "torch"]
MMDET_TOY_CFG = config_path("toy/faster-rcnn_r50_fpn_lrpet_toy.py")
#: The functions the framework packages export, which must take the same arguments.
SHARED = ["pair_convs", "default_include", "unwrap_model", "build_plan", "default_plan_hw", "compress_model_",
          "to_inference_", "save_compressed", "plan_from_checkpoint", "count_complexity", "output_tensors",
          "export_onnx", "load_model"]


def _d2_cfg(*opts):
    from detectron2.config import get_cfg

    from lrpet_dense.detectron2 import add_lrpet_config

    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(D2_TOY_CFG))
    cfg.merge_from_list(D2_TINY + list(opts))
    return cfg


def _seg_cfg(tmp_path_factory, path=SEG_TOY_CFG):
    from mmengine.config import Config

    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(tmp_path_factory.getbasetemp())}):
        return Config.fromfile(str(path))


@pytest.fixture(scope="module", params=FRAMEWORKS)
def kit(request, tmp_path_factory):
    """Per framework: the adapter, a fresh small model, the options selecting a few layers, and how its
    training checkpoints keep the hook's state."""
    name = request.param
    torch.manual_seed(0)
    if name == "detectron2":
        pytest.importorskip("detectron2")
        from detectron2.modeling import build_model

        from lrpet_dense.detectron2 import ADAPTER

        cfg = _d2_cfg()
        return SimpleNamespace(name=name, adapter=ADAPTER, cfg=cfg, make=lambda: build_model(cfg),
                               config=LRPETConfig(ratio=0.5, include=("backbone.res3.*",)),
                               training=lambda sd, state: {"model": sd, "trainer": {"hooks": {"LRPETHook": state}}})
    if name == "mmseg":
        pytest.importorskip("mmseg")
        from mmengine.registry import init_default_scope
        from mmseg.registry import MODELS

        from lrpet_dense.mmseg import ADAPTER

        cfg = _seg_cfg(tmp_path_factory)
        init_default_scope("mmseg")
        return SimpleNamespace(name=name, adapter=ADAPTER, cfg=cfg, make=lambda: MODELS.build(cfg.model),
                               config=LRPETConfig(ratio=0.5, include=("backbone.stem.*", "backbone.layer1.*")),
                               training=lambda sd, state: {"meta": {}, "state_dict": sd, "lrpet": state})
    if name == "mmdet":
        pytest.importorskip("mmdet")
        from mmdet.registry import MODELS
        from mmengine.registry import init_default_scope

        from lrpet_dense.mmdet import ADAPTER

        cfg = _seg_cfg(tmp_path_factory, MMDET_TOY_CFG)
        init_default_scope("mmdet")
        return SimpleNamespace(name=name, adapter=ADAPTER, cfg=cfg, make=lambda: MODELS.build(cfg.model),
                               config=LRPETConfig(ratio=0.5, include=("backbone.conv1", "backbone.layer1.*")),
                               training=lambda sd, state: {"meta": {}, "state_dict": sd, "lrpet": state})
    torchvision = pytest.importorskip("torchvision")
    return SimpleNamespace(name=name, adapter=PlainAdapter(torch.randn(1, 3, 32, 32)), cfg=None,
                           make=lambda: torchvision.models.resnet18(num_classes=4),
                           config=LRPETConfig(ratio=0.5, include=("layer2.*",)),
                           training=lambda sd, state: {"model": sd, "lrpet": state})


def _projected(kit):
    """A fresh model of the kit, its selected layers projected onto their plan: ``(model, layers, plan)``."""
    model = kit.make().eval()
    layers = kit.adapter.pair_convs(model, kit.config).layers
    plan = kit.adapter.build_plan(model, layers, kit.config)
    project_(layers, plan, kit.config)
    return model, layers, plan


# -- signatures ----------------------------------------------------------------------------------------------
def test_framework_packages_export_the_same_functions_with_the_same_arguments():
    pytest.importorskip("detectron2")
    pytest.importorskip("mmseg")
    pytest.importorskip("mmdet")
    import lrpet_dense.detectron2 as d2
    import lrpet_dense.mmdet as det
    import lrpet_dense.mmseg as seg

    for name in SHARED:
        shape = lambda sig: [(p.name, p.kind, p.default) for p in sig.parameters.values()]  # noqa: E731
        a = inspect.signature(getattr(d2, name))
        for pkg in (seg, det):
            b = inspect.signature(getattr(pkg, name))
            assert shape(a) == shape(b), f"{name}: detectron2 {a} vs {pkg.__name__} {b}"
    for pkg in (d2, seg, det):
        assert inspect.signature(pkg.compress_model_).parameters["check_hw"].default is None  # CHECK_HW, one default
        assert isinstance(pkg.ADAPTER, Adapter)


def test_every_adapter_supplies_the_whole_contract(kit):
    supplied = ["find_norm", "default_include", "default_input_hw", "plan_forwards", "check_inputs", "output_tensors",
                "count_complexity", "export_onnx"]
    missing = [m for m in supplied if getattr(type(kit.adapter), m) is getattr(Adapter, m)]
    assert not missing, f"{kit.name} does not supply {missing}"


def test_default_plan_hw_takes_the_model_and_an_optional_config(kit):
    model = kit.make()
    hw = kit.adapter.default_input_hw(model, kit.cfg)
    assert isinstance(hw, tuple) and len(hw) == 2 and all(isinstance(s, int) and s > 0 for s in hw)
    if kit.name == "detectron2":
        assert hw == (kit.cfg.INPUT.MIN_SIZE_TEST,) * 2 and kit.adapter.default_input_hw(model) == (800, 800)
    if kit.name == "mmseg":
        assert hw == tuple(kit.cfg.crop_size) == kit.adapter.default_input_hw(None, kit.cfg)
    if kit.name == "mmdet":  # the short side of the test pipeline's Resize scale; 800 without a config
        assert hw == (min(kit.cfg.image_scale),) * 2 and kit.adapter.default_input_hw(model) == (800, 800)


# -- compression, unwrapping, checkpoints ----------------------------------------------------------------------
def test_compress_unwraps_checks_and_round_trips(kit, tmp_path):
    model, layers, plan = _projected(kit)
    wrapped = nn.DataParallel(model)  # a data-parallel wrapper: every function unwraps it
    assert kit.adapter.pair_convs(wrapped, kit.config).names == [l.name for l in layers]
    reference = copy.deepcopy(model)
    names = kit.adapter.compress_model_(wrapped, plan)
    assert names and all(isinstance(model.get_submodule(n), nn.Module) for n in names)
    assert type(model.get_submodule(names[0])).__name__ == "FactorizedConv2d"
    ckpt = kit.adapter.save_compressed(wrapped, str(tmp_path / "c.pth"), meta={"note": "x"})
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert kit.adapter.is_compressed(loaded) and kit.adapter.plan_from_checkpoint(loaded).ranks == plan.ranks
    fresh = kit.make()
    kit.adapter.load_state_(nn.DataParallel(fresh), loaded, "c.pth")
    inputs = kit.adapter.check_inputs(fresh, CHECK_HW)
    from lrpet_dense.core import compare_outputs
    from lrpet_dense.core.verify import float64_copy

    compare_outputs(kit.adapter.output_tensors(float64_copy(reference), inputs),
                    kit.adapter.output_tensors(float64_copy(fresh), inputs))
    assert ckpt.keys() == loaded.keys()


def test_compress_refuses_weights_that_are_not_low_rank(kit):
    model = kit.make().eval()
    layers = kit.adapter.pair_convs(model, kit.config).layers
    plan = kit.adapter.build_plan(model, layers, kit.config)
    with pytest.raises(ValueError, match="not of their planned rank"):
        kit.adapter.compress_model_(model, plan)
    assert not any(type(m).__name__ == "FactorizedConv2d" for m in model.modules())


def test_the_weights_plan_is_found_first(kit, tmp_path):
    """A compressed model's own plan (its state dict) wins over a training state's; a training
    checkpoint gives its hook's plan; a dense checkpoint none."""
    model, layers, plan = _projected(kit)
    other = kit.adapter.build_plan(model, layers, kit.config.replace(ratio=0.3))
    assert other.ranks != plan.ranks
    dense_training = kit.training(model.state_dict(), {"plan": other.to_dict(), "projector": {}})
    assert kit.adapter.plan_from_checkpoint(dense_training).ranks == other.ranks
    assert not kit.adapter.is_compressed(dense_training)
    assert kit.adapter.plan_from_checkpoint(kit.training(model.state_dict(), None)) is None
    kit.adapter.compress_model_(model, plan)
    from lrpet_dense.core.factorize import compressed_state_dict

    both = kit.training(compressed_state_dict(model), {"plan": other.to_dict(), "projector": {}})
    assert kit.adapter.is_compressed(both) and kit.adapter.plan_from_checkpoint(both).ranks == plan.ranks


# -- training sessions -----------------------------------------------------------------------------------------
def _bad_state(plan: RankPlan) -> dict:
    data = plan.to_dict()
    first = data["layers"][0]
    first["shape"] = [first["shape"][0] * 2] + first["shape"][1:]
    first["rank"] = 1
    return {"plan": data, "projector": {"last_iter": 2, "num_projections": 1}}


def test_resume_checks_the_saved_plan_against_the_model(kit):
    """The saved plan must name selected layers of the same shapes, in every framework's hook alike."""
    model = kit.make()
    if kit.name == "detectron2":
        from lrpet_dense.detectron2 import LRPETHook

        hook = LRPETHook(model, kit.config)
        bad = _bad_state(hook.plan)
        with pytest.raises(ValueError, match="the checkpoint's LRPET plan does not fit this model"):
            hook.load_state_dict(bad)
    elif kit.name in ("mmseg", "mmdet"):
        from lrpet_dense.openmmlab import LRPETHook  # the one a config builds, for both tasks

        hook = LRPETHook(**{k: v for k, v in kit.config.to_dict().items()})
        runner = mock.MagicMock()
        runner.model = model
        hook.before_train(runner)
        bad = _bad_state(hook.plan)
        fresh = LRPETHook(**kit.config.to_dict())
        fresh.after_load_checkpoint(runner, {"lrpet": bad})
        with pytest.raises(ValueError, match="the checkpoint's LRPET plan does not fit this model"):
            fresh.before_train(runner)
    else:
        session = kit.adapter.session(model, kit.config)
        with pytest.raises(ValueError, match="the checkpoint's LRPET plan does not fit this model"):
            session.load_state_dict(_bad_state(session.plan))


def test_a_norm_that_is_not_a_batchnorm_is_noted(kit):
    if kit.name == "detectron2":
        from detectron2.layers import Conv2d

        model = nn.Sequential(Conv2d(3, 8, 3, norm=nn.GroupNorm(2, 8)), Conv2d(8, 8, 3, norm=nn.BatchNorm2d(8)))
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    adapter = PlainAdapter(torch.randn(1, 3, 12, 12)) if kit.name == "torch" else kit.adapter
    pairing = adapter.pair_convs(model, LRPETConfig(include=("*",)))
    assert pairing.unpaired == ["0"]
    assert [n for n in pairing.notes if n.startswith("0: norm GroupNorm is not a BatchNorm with running statistics")]
    assert type(pairing.layers[1].bn).__name__ == "BatchNorm2d"


def test_sessions_refuse_a_factorised_model(kit):
    model, _, plan = _projected(kit)
    kit.adapter.compress_model_(model, plan)
    with pytest.raises(ValueError, match="LRPET training needs a dense model, but the model is factorised"):
        kit.adapter.session(model, kit.config)


def test_the_session_is_the_one_core_class(kit):
    model = kit.make()
    if kit.name == "detectron2":
        from lrpet_dense.detectron2 import LRPETHook

        session = LRPETHook(model, kit.config).session
    elif kit.name in ("mmseg", "mmdet"):
        from lrpet_dense.openmmlab import LRPETHook  # the one a config builds, for both tasks

        hook = LRPETHook(**kit.config.to_dict())
        runner = mock.MagicMock()
        runner.model = model
        hook.before_train(runner)
        session = hook.session
    else:
        session = kit.adapter.session(model, kit.config)
    assert type(session) is LRPETSession and session.plan.ranks
    state = session.state_dict()
    assert set(state) == {"plan", "projector", "steps_done"}


# -- the command line ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("framework", ["detectron2", "mmseg", "mmdet"])
def test_compress_input_size_changes_only_the_count(framework, tmp_path, tmp_path_factory, capsys):
    """``compress --input-size`` sets the params/MACs count's input in both frameworks; a new plan is made
    at the default planning size."""
    from lrpet_dense.cli import compress

    torch.manual_seed(0)
    if framework == "detectron2":
        pytest.importorskip("detectron2")
        from detectron2.modeling import build_model

        from lrpet_dense.detectron2 import ADAPTER, default_plan_hw, lrpet_config

        cfg = _d2_cfg("LRPET.INCLUDE", ["backbone.res3.*"], "LRPET.TARGET_MACS_CUT", 0.0)
        model = build_model(cfg).eval()
        torch.save({"model": model.state_dict()}, tmp_path / "dense.pth")
        config = lrpet_config(cfg)
        argv = ["--config", str(D2_TOY_CFG), "--checkpoint", str(tmp_path / "dense.pth"), "--output",
                str(tmp_path / "c.pth"), "--ratio", "0.5", "--project", "--input-size", "96", "96",
                *D2_TINY, "LRPET.INCLUDE", "['backbone.res3.*']", "LRPET.TARGET_MACS_CUT", "0.0"]
        assert compress.main_det(argv) == 0
        hw = default_plan_hw(model, cfg)
    else:
        pytest.importorskip(framework)
        from mmengine.registry import init_default_scope

        if framework == "mmseg":
            from mmseg.registry import MODELS

            from lrpet_dense.mmseg import ADAPTER, default_plan_hw, lrpet_config
        else:
            from mmdet.registry import MODELS

            from lrpet_dense.mmdet import ADAPTER, default_plan_hw, lrpet_config
        path = SEG_TOY_CFG if framework == "mmseg" else MMDET_TOY_CFG
        cfg = _seg_cfg(tmp_path_factory, path)
        init_default_scope(framework)
        model = MODELS.build(cfg.model).eval()
        torch.save({"meta": {}, "state_dict": model.state_dict()}, tmp_path / "dense.pth")
        config = lrpet_config(cfg)
        main = compress.main_seg if framework == "mmseg" else compress.main_mmdet
        with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(tmp_path_factory.getbasetemp())}):
            assert main([str(path), str(tmp_path / "dense.pth"), str(tmp_path / "c.pth"), "--plan-from-config",
                         "--project", "--input-size", "48", "48"]) == 0
        hw = default_plan_hw(model, cfg)
    text = capsys.readouterr().out
    assert f"at {96 if framework == 'detectron2' else 48}x" in text  # the count's input
    saved = ADAPTER.plan_from_checkpoint(torch.load(tmp_path / "c.pth", weights_only=True))
    uniform = config.replace(ratio=0.5, target_macs_cut=None, target_latency_cut=None, rank_policy="uniform")
    expected = ADAPTER.build_plan(model, ADAPTER.pair_convs(model, config).layers, uniform, hw)
    assert saved.layers and all(saved[n].out_hw == expected[n].out_hw for n in saved.layers if n in expected)
    assert hw != ((96, 96) if framework == "detectron2" else (48, 48))
