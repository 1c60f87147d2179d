"""The mmseg adapter in mmseg's own runner and tools, on a tiny generated VOC2012 set (CPU).

One real training run of the toy config by mmseg's ``tools/train.py`` (module-scoped) feeds the
projection, resume, compression and inference checks.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mmseg")

import mmseg  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import lrpet_dense.mmseg as lm  # noqa: E402
from conftest import seg_env  # noqa: E402  (the environment of conftest.seg_run, the uninterrupted run)
from lrpet_dense.core import FactorizedConv2d, LRPETConfig, RankPlan  # noqa: E402
from lrpet_dense.configs import config_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY_CFG = Path(config_path("toy/pspnet_r50-d8_lrpet_toy.py"))
FULL_CFG = Path(config_path("pspnet_r50-d8_lrpet_voc12aug-512x512.py"))
MMSEG_TOOLS = Path(mmseg.__file__).parent / ".mim" / "tools"

pytestmark = pytest.mark.timeout(600)


def _run(cmd, env, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable] + [str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _toy_cfg(data_root: Path, work_dir: Path) -> Config:
    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(data_root)}):
        cfg = Config.fromfile(str(TOY_CFG))
    cfg.work_dir = str(work_dir)
    return cfg


def _effective_rank(w: torch.Tensor, rtol: float = 1e-4) -> int:
    s = torch.linalg.svdvals(w.detach().float().reshape(w.shape[0], -1))
    return int((s > rtol * s[0]).sum())


@pytest.fixture(scope="module")
def toy_data(seg_toy_data) -> Path:
    return seg_toy_data


@pytest.fixture(scope="module")
def train_run(seg_run) -> Path:
    """mmseg's own tools/train.py on the toy config, unchanged: 3 iterations, projections at 2 and 3
    (``conftest.seg_run``, shared with ``tests/test_faults.py``)."""
    return seg_run


@pytest.fixture(scope="module")
def compressed(train_run, toy_data) -> tuple:
    out = train_run / "compressed.pth"
    proc = _run([REPO / "tools" / "compress_seg.py", TOY_CFG, train_run / "iter_3.pth", out], seg_env(toy_data),
                cwd=train_run)
    return out, proc.stdout


def _load(path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


# -- training ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_projection_at_interval_and_end(train_run):
    scalars = [json.loads(l) for f in glob.glob(str(train_run / "*" / "vis_data" / "scalars.json"))
               for l in open(f)]
    steps = sorted(s["step"] for s in scalars if "lrpet/time_s" in s)
    assert steps == [2, 3], steps
    last = [s for s in scalars if "lrpet/num_projections" in s][-1]
    assert last["lrpet/num_projections"] == 2
    for key in ("lrpet/energy_kept_mean", "lrpet/energy_kept_min", "lrpet/rel_change_mean", "lrpet/rel_change_max"):
        assert key in last


@pytest.mark.slow
@pytest.mark.parametrize("name", ["iter_2.pth", "iter_3.pth"])
def test_checkpointed_weights_are_low_rank(train_run, name):
    ckpt = _load(train_run / name)  # stock mmengine checkpoints load weights_only (lrpet_dense.mmseg allow-lists)
    plan = RankPlan.from_dict(ckpt["lrpet"]["plan"])
    # every conv of ResNetV1c-50 (3 stem + 48 block + 4 downsample) but layer1.0.conv1 (64 -> 64, 1x1):
    # at p = 0.5 its rank 32 would cost 32 x (64 + 64) MACs per pixel, as many as the dense conv, so it
    # is left dense and not projected
    assert len(plan) == 54 and plan.left_dense == ["backbone.layer1.0.conv1"]
    assert plan.ratio == 0.5
    sd = ckpt["state_dict"]
    for name_, lp in plan.layers.items():
        assert _effective_rank(sd[name_ + ".weight"]) <= lp.rank, name_
    w = sd["backbone.layer1.0.conv1.weight"]
    assert _effective_rank(w) == min(w.shape[0], w[0].numel())
    # a head conv is not in the plan and stays full rank
    w = sd["decode_head.bottleneck.conv.weight"]
    assert _effective_rank(w) == min(w.shape[0], w[0].numel())


@pytest.mark.slow
def test_iou_metric_ran(train_run):
    scalars = [json.loads(l) for f in glob.glob(str(train_run / "*" / "vis_data" / "scalars.json"))
               for l in open(f)]
    assert any("mIoU" in s for s in scalars)


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(train_run, toy_data, tmp_path):
    # resumed by the same tool in the same environment as the uninterrupted run (conftest.seg_run): in this
    # process the thread count can differ (pytest-xdist workers run one thread), and BN's running variance then
    # differs beyond float32 round-off after three SGD steps
    _run([MMSEG_TOOLS / "train.py", TOY_CFG, "--work-dir", tmp_path, "--resume", "--cfg-options",
          f"load_from={train_run / 'iter_2.pth'}"], seg_env(toy_data), tmp_path)
    resumed = _load(tmp_path / "iter_3.pth")
    full = _load(train_run / "iter_3.pth")
    assert resumed["lrpet"]["projector"] == full["lrpet"]["projector"] == {"last_iter": 3, "num_projections": 2}
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, msg=k)


# -- compression and inference ----------------------------------------------------------------
@pytest.mark.slow
def test_compress_tool_reports_complexity(compressed):
    _, out = compressed
    assert "get_model_complexity_info" in out
    rows = {l.split()[0]: l for l in out.splitlines() if l.startswith(("backbone ", "model "))}
    assert set(rows) == {"backbone", "model"}
    assert "factorised 54 of 54" in out and "logits checked against the dense model in float64" in out


@pytest.mark.slow
def test_compressed_checkpoint_loads_with_init_model(compressed, train_run, toy_data):
    """The factorised segmentor computes what the projected dense one computes: logits (``mode='tensor'``,
    before the argmax) compared in float64, so it holds on any CPU. ``inference_model`` is a smoke test."""
    from mmseg.apis import inference_model, init_model

    from lrpet_dense.core import compare_outputs
    from lrpet_dense.core.verify import float64_copy

    path, _ = compressed
    ckpt = _load(path)
    plan = RankPlan.from_dict(ckpt["meta"]["lrpet_plan"])
    cfg = _toy_cfg(toy_data, train_run)
    fact = init_model(cfg, str(path), device="cpu")
    assert isinstance(fact.backbone.layer3[0].conv2, FactorizedConv2d)
    # D8: dilated convs stay dilated (the first block of a stage has half the dilation, contract_dilation)
    assert fact.backbone.layer4[1].conv2.conv_a.dilation == (4, 4)
    assert fact.backbone.layer3[1].conv2.conv_a.dilation == (2, 2)
    assert fact.backbone.layer4[1].conv2.conv_a.padding == (4, 4)
    # no missing / unexpected keys: strict torch load into a fresh factorised model (the plan and the note are
    # dropped while loading)
    assert set(fact.state_dict()) == {k for k in ckpt["state_dict"] if not k.startswith("_lrpet_")}
    init_default_scope("mmseg")
    from mmseg.registry import MODELS
    fresh = MODELS.build(cfg.model)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert fresh.lrpet_plan.ranks == plan.ranks

    dense, _ = lm.load_model(cfg, str(train_run / "iter_3.pth"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ref, got = float64_copy(dense)(x, mode="tensor"), float64_copy(fact)(x, mode="tensor")
    compare_outputs(ref, got, rtol=1e-4)
    imgs = sorted(glob.glob(str(toy_data / "VOCdevkit" / "VOC2012" / "JPEGImages" / "*.jpg")))[-1:]
    result = inference_model(fact, imgs[0])
    assert result.pred_sem_seg.data.shape[-2:] == result.seg_logits.data.shape[-2:]


@pytest.mark.slow
def test_dense_compressed_mismatch_is_an_error(compressed, train_run, toy_data):
    from mmseg.registry import MODELS

    path, _ = compressed
    init_default_scope("mmseg")
    cfg = _toy_cfg(toy_data, train_run)
    fact = MODELS.build(cfg.model)
    fact.load_state_dict(_load(path)["state_dict"])
    with pytest.raises(ValueError, match="checkpoint is dense"):
        fact.load_state_dict(_load(train_run / "iter_3.pth")["state_dict"])


@pytest.mark.slow
def test_mmseg_test_tool_runs_compressed_checkpoint(compressed, toy_data, train_run):
    path, _ = compressed
    proc = _run([MMSEG_TOOLS / "test.py", TOY_CFG, path, "--work-dir", train_run / "test_wd"], seg_env(toy_data),
                cwd=train_run)
    text = proc.stdout + proc.stderr
    assert "mIoU" in text
    assert "projection starts" not in text and "LRPET: the loaded checkpoint" not in text  # nothing is projected


@pytest.mark.slow
def test_stock_segmentor_loads_compressed_when_lrpet_dense_is_imported(compressed, train_run, toy_data):
    """``init_model`` with the stock ``EncoderDecoder`` in a process that imported lrpet_dense.mmseg builds the
    factorised segmentor (the same logits as the LRPET type's)."""
    from mmseg.apis import init_model

    path, _ = compressed
    cfg = _toy_cfg(toy_data, train_run)
    lrpet = init_model(cfg, str(path), device="cpu")
    cfg.model.type = "EncoderDecoder"
    stock = init_model(cfg, str(path), device="cpu")
    assert type(stock).__name__ == "EncoderDecoder" and isinstance(stock.backbone.layer3[0].conv2, FactorizedConv2d)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lrpet(x, mode="tensor"), stock(x, mode="tensor"))
    stock.train()
    with pytest.raises(RuntimeError, match="factorised while a compressed checkpoint was loaded"):
        stock(x, mode="tensor")  # fine-tuning it would not train the factorised convs


@pytest.mark.slow
def test_stock_segmentor_without_lrpet_dense_shows_the_note(compressed, toy_data, train_run, tmp_path):
    """What a user sees who evaluates a compressed checkpoint with a stock config that imports nothing of ours:
    mmengine leaves the factorised convs' dense layers as initialised and warns; the first unexpected key it names
    is the checkpoint's note, naming the model type to set."""
    import re

    path, _ = compressed
    cfg = tmp_path / "plain.py"
    cfg.write_text(f"_base_ = {str(TOY_CFG)!r}\nmodel = dict(type='EncoderDecoder')\n"
                   "custom_imports = dict(_delete_=True, imports=[])\ncustom_hooks = []\n")
    proc = _run([MMSEG_TOOLS / "test.py", cfg, path, "--work-dir", tmp_path / "wd"], seg_env(toy_data), cwd=tmp_path)
    first = re.search(r"unexpected key in source state_dict: ([^,]*),", proc.stdout + proc.stderr)
    assert first and first.group(1) == (
        "_lrpet_note: LRPET COMPRESSED CHECKPOINT - build the model with type='LRPETEncoderDecoder' "
        "(custom_imports='lrpet_dense.mmseg'); this model was built without lrpet_dense and got NO weights for its "
        "factorised convs")


# -- pairing, plan and options (no training) --------------------------------------------------
@pytest.fixture(scope="module")
def full_model():
    init_default_scope("mmseg")
    from mmseg.registry import MODELS
    cfg = Config.fromfile(str(FULL_CFG))
    cfg.model.pretrained = None
    return cfg, MODELS.build(cfg.model)  # SyncBN, as in the paper's config


def test_pairing_resnetv1c_and_convmodule(full_model):
    _, model = full_model
    pairing = lm.pair_convs(model, LRPETConfig(include=("*",)))
    pairs, unpaired, frozen = pairing.layers, pairing.unpaired, pairing.frozen_skipped
    by = {p.name: p for p in pairs}
    assert by["backbone.stem.0"].bn is model.backbone.stem[1]
    assert by["backbone.layer1.0.conv2"].bn is model.backbone.layer1[0].bn2
    assert by["backbone.layer1.0.downsample.0"].bn is model.backbone.layer1[0].downsample[1]
    assert by["decode_head.bottleneck.conv"].bn is model.decode_head.bottleneck.bn
    assert isinstance(by["backbone.layer1.0.conv1"].bn, torch.nn.SyncBatchNorm)
    assert set(unpaired) == {"decode_head.conv_seg", "auxiliary_head.conv_seg"}
    assert not frozen
    backbone = lm.pair_convs(model)
    assert len(backbone.layers) == 55 and not backbone.unpaired


def test_full_config_plans_a_30_percent_backbone_cut(full_model):
    cfg, model = full_model
    config = lm.lrpet_config(cfg)  # the config's LRPETHook options
    assert config.target_macs_cut == 0.3 and config == lm.LRPETHook(**{k: v for k, v in dict(
        cfg.custom_hooks[0]).items() if k != "type"}).config
    plan = lm.build_plan(model, lm.pair_convs(model, config).layers, config)
    assert 0.30 <= plan.reached_macs_cut < 0.31
    assert 0.40 < plan.ratio < 0.46  # docs/method.md, section 5: p = 0.4239 for a 30% cut
    # the reference is every conv of the backbone, from the crop size (512x512) of the config
    from lrpet_dense.core.selection import conv_macs_of, conv_names, output_sizes
    names = conv_names(model, "backbone.")
    sizes = output_sizes(model, names, lambda: model.backbone(torch.zeros(1, 3, 512, 512)))
    assert plan.reference_macs == conv_macs_of(model, names, sizes)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=0.5, target_macs_cut=0.3), "give one of ratio .* not several"),
    (dict(ratio=1.0), r"ratio must lie in \[0, 1\)"),
    (dict(target_macs_cut=1.0), r"target_macs_cut must lie in \(0, 1\)"),
    (dict(ratio=0.5, interval=0), "interval must be an integer >= 1"),
    (dict(ratoi=0.5), r"unknown option\(s\) \['ratoi'\]"),
    (dict(ratio=0.5, residual=2.0), "residual"),
    (dict(ratio=0.5, ridge=-1.0), "ridge"),
    (dict(ratio=0.5, overrides={"backbone.*": 1.5}), "overrides"),
    (dict(ratio=0.5, include=[""]), "include"),
    (dict(ratio=0.5, energy_transfer="yes"), "energy_transfer"),
    (dict(ratio=0.5, plan_input_size=(64,)), "plan_input_size"),
])
def test_hook_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match="^LRPETHook: " + match):
        lm.LRPETHook(**kwargs)


def test_hook_warns_on_checkpoint_without_state_only_when_training(full_model):
    """Loading a checkpoint without LRPET state (dense, older, compressed) logs nothing by itself (tools/test.py
    projects nothing); training from it says that projection starts afresh."""
    hook = lm.LRPETHook(ratio=0.5, interval=2, include=["backbone.stem.*"])
    runner = mock.MagicMock()
    runner.model = full_model[1]
    hook.after_load_checkpoint(runner, {"meta": {}, "state_dict": {}})
    assert not runner.logger.warning.called and not runner.logger.info.called
    hook.before_train(runner)
    warnings = [c[0][0] for c in runner.logger.warning.call_args_list]
    assert any("no 'lrpet' state" in w and "projection starts from here" in w for w in warnings), warnings


def test_frozen_stages_are_skipped_by_default():
    init_default_scope("mmseg")
    from mmseg.registry import MODELS
    cfg = Config.fromfile(str(FULL_CFG))
    cfg.model.pretrained = None
    cfg.model.backbone.update(norm_cfg=dict(type="BN", requires_grad=True), frozen_stages=1)
    model = MODELS.build(cfg.model)
    pairing = lm.pair_convs(model)
    assert "backbone.stem.0" in pairing.frozen_skipped and "backbone.layer1.0.conv1" in pairing.frozen_skipped
    assert "backbone.layer2.0.conv1" in pairing.names
    everything = lm.pair_convs(model, LRPETConfig(include_frozen=True))
    assert len(everything.layers) == 55 and not everything.frozen_skipped


def test_bn_statistics_recomputed_after_the_final_projection(train_run):
    """The toy config's ``precise_bn_iters=2``: the last checkpoint's BN statistics come from 2 training
    batches after the final projection (counters reset), in the backbone and both heads (mode='loss')."""
    ckpt = torch.load(train_run / "iter_3.pth", map_location="cpu", weights_only=False)
    tracked = {k: int(v) for k, v in ckpt["state_dict"].items() if k.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {2}, {v: k for k, v in tracked.items()}
    assert any(k.startswith("auxiliary_head.") for k in tracked) and any(k.startswith("decode_head.") for k in tracked)
    log = "\n".join(Path(p).read_text() for p in glob.glob(str(train_run / "*" / "*.log")))
    assert "BN recalibration after the final projection" in log and "recomputed from 2 training batches" in log
