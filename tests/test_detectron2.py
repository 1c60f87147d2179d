"""Tests of the detectron2 adapter on the real detectron2, on CPU, with tiny settings.

A tiny toy PASCAL VOC 2007 set (one training image) (``lrpet_dense.data.toy_voc``) is registered with detectron2's
own ``register_pascal_voc`` (``LRPET_TOY_VOC``), and the real ``tools/train_det.py`` trains
``configs/toy/faster_rcnn_lrpet_toy.yaml`` for 5 iterations, projecting every 2 steps. One training
run is shared by the module's assertions. The settings make training reproducible across
``--resume`` (one training image, no flip, RPN/ROI samplers that keep every candidate), which
detectron2 does not promise in general.
"""
import copy
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import HookBase, SimpleTrainer, hooks  # noqa: E402
from detectron2.layers import Conv2d, FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402

from lrpet_dense.core import FactorizedConv2d, LRPETConfig, build_rank_plan  # noqa: E402
from lrpet_dense.core.selection import layer_specs  # noqa: E402
from lrpet_dense.detectron2 import (LRPETHook, add_lrpet_config, build_plan, compress_model_,  # noqa: E402
                                    insert_before_checkpointer, lrpet_config, pair_convs, plan_from_checkpoint)
from lrpet_dense.detectron2 import default_plan_hw  # noqa: E402

# The settings and the uninterrupted run are shared with tests/test_faults.py (tests/conftest.py).
from conftest import D2_TINY as TINY  # noqa: E402
from conftest import D2_TOY_CFG as TOY_CFG  # noqa: E402
from conftest import REPO, d2_train, macs_cut, module_temp, run_tool  # noqa: E402
from lrpet_dense.configs import config_path  # noqa: E402

PROJECTED_AT = [2, 4, 5]  # every INTERVAL steps, and after the last step


def toy_cfg(*opts, config=TOY_CFG):
    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(TINY + list(opts))
    return cfg


def train(toy_voc, out, *extra):
    return d2_train(toy_voc, out, *extra)


def projected_steps(log_text):
    return [int(s) for s in re.findall(r"LRPET projection at step (\d+)", log_text)]


def copypaste_ap(text):
    """AP, AP50, AP75 from detectron2's ``copypaste:`` evaluation lines."""
    m = re.search(r"copypaste: AP,AP50,AP75\s*\n.*copypaste: ([\d.naN]+),([\d.naN]+),([\d.naN]+)", text)
    assert m, "no evaluation result in the output"
    return tuple(float(v) for v in m.groups())


def numerical_rank(w, rtol=1e-4):
    """Singular values above ``rtol * s_1``, from the eigenvalues of the smaller Gram matrix (fast)."""
    m = w.reshape(w.shape[0], -1).double()
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    ev = torch.linalg.eigvalsh(g)
    return int((ev > (rtol ** 2) * ev[-1]).sum())


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def toy_voc(d2_toy_voc):
    """One training image listed twice (see ``conftest.d2_toy_voc``)."""
    return d2_toy_voc


@pytest.fixture(scope="module")
def run_a(d2_run):
    """One uninterrupted LRPET training run (5 steps, projections at 2, 4, 5, evaluation at the end),
    shared with ``tests/test_faults.py`` (``conftest.d2_run``)."""
    return d2_run


@pytest.fixture(scope="module")
def compressed(run_a, request):
    out, _ = run_a
    path = module_temp(request, "compressed") / "model_compressed.pth"
    text = run_tool(["tools/compress_det.py", "--config", str(TOY_CFG), "--checkpoint", str(out / "model_final.pth"),
                     "--output", str(path), *TINY])
    return path, text


# ---------------------------------------------------------------------------- config and parser
def test_config_keys_and_parser():
    cfg = get_cfg()
    add_lrpet_config(cfg)
    # one key per LRPETConfig field (and the ENABLED switch), with that class's defaults
    assert set(cfg.LRPET) == {"ENABLED"} | {f.upper() for f in LRPETConfig.field_names()}
    assert lrpet_config(cfg) == LRPETConfig()
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import train_det
    finally:
        sys.path.remove(str(REPO / "tools"))
    for flag in ("--config", "--config-file"):
        args = train_det.get_parser().parse_args([flag, "a.yaml", "--eval-only", "MODEL.WEIGHTS", "x.pth"])
        assert args.config_file == "a.yaml" and args.eval_only and args.opts == ["MODEL.WEIGHTS", "x.pth"]
    for name in ("faster_rcnn_lrpet.yaml", "faster_rcnn_baseline.yaml", "faster_rcnn_fpn_lrpet.yaml"):
        c = get_cfg()
        add_lrpet_config(c)
        c.merge_from_file(str(Path(config_path(name))))
        assert c.DATASETS.TEST == ("voc_2007_test",) and c.MODEL.WEIGHTS.startswith("detectron2://")
        assert c.LRPET.ENABLED == ("lrpet" in name)
    assert c.LRPET.TARGET_MACS_CUT == 0.5


# ---------------------------------------------------------------------------- pairing
def test_pairing_detectron2_norms():
    model = nn.Module()
    model.backbone = nn.Module()
    b = model.backbone
    b.bn = Conv2d(3, 8, 3, bias=False, norm=nn.BatchNorm2d(8))
    b.frozen_bn = Conv2d(8, 8, 3, bias=False, norm=FrozenBatchNorm2d(8))
    b.sync_bn = Conv2d(8, 8, 1, bias=False, norm=nn.SyncBatchNorm(8))
    b.no_norm = Conv2d(8, 8, 1, bias=True)
    b.gn = Conv2d(8, 8, 1, bias=False, norm=nn.GroupNorm(2, 8))
    b.plain = nn.Conv2d(8, 8, 1)
    b.depthwise = Conv2d(8, 8, 3, groups=8)
    b.frozen = Conv2d(8, 8, 1, norm=nn.BatchNorm2d(8))
    b.frozen.weight.requires_grad_(False)
    p = pair_convs(model)
    pairs = {l.name.split(".")[-1]: l.bn for l in p.layers}
    assert pairs["bn"] is b.bn.norm and pairs["frozen_bn"] is b.frozen_bn.norm and pairs["sync_bn"] is b.sync_bn.norm
    assert pairs["no_norm"] is None and pairs["gn"] is None and pairs["plain"] is None
    assert "depthwise" not in pairs and "frozen" not in pairs
    assert p.frozen_skipped == ["backbone.frozen"]
    notes = " ".join(p.notes)
    assert "backbone.gn" in notes and "backbone.plain" in notes and "backbone.depthwise" in notes
    assert "backbone.no_norm" not in notes  # a conv without norm is a clean case: projected without BNR
    assert "frozen" in pairs.keys() | {l.name.split(".")[-1]
                                       for l in pair_convs(model, LRPETConfig(include_frozen=True)).layers}
    with pytest.raises(ValueError, match="matches no"):
        pair_convs(model, LRPETConfig(include=("backbone.nothing*",)))
    # a filter_fn keeps only what it accepts (torchao's convention: module, fully qualified name)
    only_1x1 = pair_convs(model, filter_fn=lambda conv, name: conv.kernel_size == (1, 1))
    assert {l.name.split(".")[-1] for l in only_1x1.layers} == {"sync_bn", "no_norm", "gn", "plain"}


def test_default_selection_c4_and_fpn():
    c4 = build_model(toy_cfg())
    p = pair_convs(c4, lrpet_config(toy_cfg()))
    assert any(n.startswith("roi_heads.res5.") for n in p.names)
    assert not any(n.startswith(("backbone.stem", "backbone.res2")) for n in p.names)  # FREEZE_AT=2
    assert set(p.frozen_skipped) == {n for n, m in c4.named_modules() if isinstance(m, nn.Conv2d)
                                     and n.startswith(("backbone.stem", "backbone.res2"))}
    assert all(l.bn is not None for l in p.layers) and not p.notes

    fpn_cfg = toy_cfg(config=Path(config_path("faster_rcnn_fpn_lrpet.yaml")))
    fpn_cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "BN", "INPUT.MIN_SIZE_TEST", "128"])
    fpn = build_model(fpn_cfg)
    p = pair_convs(fpn, lrpet_config(fpn_cfg))
    # the ResNet (trained stages) and the FPN's lateral/output convs (no norm: no BN rectification)
    assert p.names and all(n.startswith(("backbone.bottom_up.res", "backbone.fpn_")) for n in p.names)
    fpn_convs = [n for n in p.names if n.startswith("backbone.fpn_")]
    assert len(fpn_convs) == 8 and all(l.bn is None for l in p.layers if l.name in fpn_convs)
    plan = build_plan(fpn, p.layers, lrpet_config(fpn_cfg), default_plan_hw(fpn, fpn_cfg))
    assert 0.5 <= plan.reached_macs_cut < 0.52 and plan.target_macs_cut == 0.5
    # the cut is a fraction of all of model.backbone's convs (what FlopCountAnalysis calls the backbone)
    assert plan.reference_macs > plan.macs_before > 0


# ---------------------------------------------------------------------------- hook in SimpleTrainer
class _TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(Conv2d(3, 16, 3, padding=1, bias=False, norm=nn.BatchNorm2d(16)),
                                      Conv2d(16, 16, 3, padding=1, bias=False, norm=nn.BatchNorm2d(16)))

    def forward(self, x):
        return {"loss": self.backbone(x).square().mean()}


def test_hook_schedule_storage_and_state():
    torch.manual_seed(0)
    model = _TinyModel()
    layers = pair_convs(model).layers
    for l in layers:  # BN scales far from 1, so BN rectification matters
        l.bn.running_var.uniform_(0.05, 0.2)
        l.bn.momentum = 0.0
    plan = build_rank_plan(layer_specs(layers, {l.name: (8, 8) for l in layers}), LRPETConfig(ratio=0.5))
    hook = LRPETHook(model, LRPETConfig(interval=3), layers=layers, plan=plan)
    data = iter(lambda: torch.randn(2, 3, 8, 8), None)
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.register_hooks([hook])
    trainer.train(0, 7)
    hist = trainer.storage.history("lrpet/energy_kept_mean").values()
    # storage.iter is the 0-based iteration: steps 3 and 6 (interval), 7 (last)
    assert [it for _, it in hist] == [2, 5, 6]
    for key in ("lrpet/time_s", "lrpet/energy_kept_min", "lrpet/rel_change_mean", "lrpet/rel_change_max"):
        assert len(trainer.storage.history(key).values()) == 3
    # energy kept is a fraction of the BN-folded weight's energy
    worst = [v for v, _ in trainer.storage.history("lrpet/energy_kept_min").values()]
    assert all(0 < w <= e <= 1 + 1e-6 for w, (e, _) in zip(worst, hist)), (worst, hist)
    for l in layers:
        assert numerical_rank(l.conv.weight.detach()) == plan[l.name].rank
    state = hook.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)  # plain data: round-trips through the weights-only loader
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=True) == state
    assert state["projector"] == {"last_iter": 7, "num_projections": 3} and state["plan"] == plan.to_dict()
    fresh = LRPETHook(model, LRPETConfig(interval=3), layers=layers, plan=plan)
    fresh.load_state_dict(state)
    assert fresh.projector.last_iter == 7 and not fresh.projector.should_project(7, is_last=True)


@pytest.mark.parametrize("precise_bn_iters", [0, 3])
def test_hook_recomputes_bn_statistics_after_the_final_projection(precise_bn_iters):
    """LRPET.PRECISE_BN_ITERS: after the last step's projection the BN statistics are recomputed from that
    many training batches (counters reset: num_batches_tracked = batches used); 0 leaves training's."""
    torch.manual_seed(0)
    model = _TinyModel()
    layers = pair_convs(model).layers
    plan = build_rank_plan(layer_specs(layers, {l.name: (8, 8) for l in layers}), LRPETConfig(ratio=0.5))
    config = LRPETConfig(interval=3, precise_bn_iters=precise_bn_iters)
    trainer = SimpleTrainer(model, iter(lambda: torch.randn(2, 3, 8, 8), None),
                            torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.register_hooks([LRPETHook(model, config, layers=layers, plan=plan)])
    weights = []
    trainer.register_hooks([_AfterStep(lambda t: weights.append([l.conv.weight.clone() for l in layers]))])
    trainer.train(0, 7)
    assert [int(l.bn.num_batches_tracked) for l in layers] == [precise_bn_iters or 7] * len(layers)
    assert all(l.bn.momentum == 0.1 for l in layers) and model.training
    for w, l in zip(weights[-1], layers):  # the weights are those of the final projection
        assert torch.equal(w, l.conv.weight)


def test_hook_leaves_bn_statistics_to_detectron2s_precise_bn():
    torch.manual_seed(0)
    model = _TinyModel()
    layers = pair_convs(model).layers
    plan = build_rank_plan(layer_specs(layers, {l.name: (8, 8) for l in layers}), LRPETConfig(ratio=0.5))
    data = iter(lambda: torch.randn(2, 3, 8, 8), None)
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.register_hooks([LRPETHook(model, LRPETConfig(interval=3, precise_bn_iters=3), layers=layers, plan=plan),
                            hooks.PreciseBN(0, model, data, 5)])
    trainer.train(0, 7)
    # 7 training steps + PreciseBN's 5 batches (fvcore does not reset the counter); ours would have reset it to 3
    assert [int(l.bn.num_batches_tracked) for l in layers] == [7 + 5] * len(layers)


class _AfterStep(HookBase):
    def __init__(self, fn):
        self.fn = fn

    def after_step(self):
        self.fn(self.trainer)


def test_insert_before_checkpointer():
    ckpt = hooks.PeriodicCheckpointer(DetectionCheckpointer(nn.Linear(1, 1)), 10)
    ev = hooks.EvalHook(0, lambda: {})
    mine = HookBase()
    out = insert_before_checkpointer([hooks.IterationTimer(), hooks.LRScheduler(), ckpt, ev], mine)
    assert out.index(mine) == out.index(ckpt) - 1
    out = insert_before_checkpointer([hooks.IterationTimer(), ev], mine)  # non-main workers: no checkpointer
    assert out.index(mine) == out.index(ev) - 1
    model = _TinyModel()
    pbn = hooks.PreciseBN(0, model, iter(lambda: torch.randn(2, 3, 8, 8), None), 1)
    out = insert_before_checkpointer([hooks.IterationTimer(), pbn, ckpt, ev], mine)
    assert out.index(mine) == out.index(pbn) - 1  # BN statistics are recomputed for projected weights


# ---------------------------------------------------------------------------- real training run
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_projection_schedule_and_logging(run_a):
    out, _ = run_a
    log = (out / "log.txt").read_text()
    assert projected_steps(log) == PROJECTED_AT
    assert "LRPET rank plan" in log and "frozen convs" in log
    metrics = [json.loads(l) for l in (out / "metrics.json").read_text().splitlines() if l.strip()]
    assert any("lrpet/energy_kept_mean" in m and "lrpet/rel_change_max" in m for m in metrics)
    # PascalVOCDetectionEvaluator ran at the end of training
    assert any("bbox/AP50" in m for m in metrics)
    assert "Evaluating voc_toy_2007_test using 2007 metric" in log


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_final_weights_low_rank_and_frozen_untouched(run_a):
    out, _ = run_a
    ckpt = load(out / "model_final.pth")  # detectron2 checkpoints with the hook state load weights_only
    plan = plan_from_checkpoint(ckpt)
    assert plan is not None and plan.target_macs_cut == 0.5
    sd = ckpt["model"]
    for name, lp in plan.layers.items():
        w = sd[name + ".weight"]
        assert numerical_rank(w) == lp.rank < lp.full_rank, name  # trained weights had full rank
    # frozen layers (FREEZE_AT=2) are not planned and equal their initialisation (seeded like the run)
    cfg = toy_cfg()
    seed_all_rng(cfg.SEED)
    init = build_model(cfg).state_dict()
    frozen = [k for k in sd if k.startswith(("backbone.stem.", "backbone.res2.")) and k.endswith("conv1.weight")]
    assert frozen and not any(k[: -len(".weight")] in plan for k in frozen)
    for k in frozen:
        torch.testing.assert_close(sd[k], init[k], rtol=0, atol=0)
        assert numerical_rank(sd[k]) == min(sd[k].shape[0], sd[k][0].numel())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hook_runs_before_checkpointer(run_a):
    out, _ = run_a
    # model_0000001.pth is written after step 2, the first projection: it must already be low-rank
    ckpt = load(out / "model_0000001.pth")
    plan = plan_from_checkpoint(ckpt)
    assert ckpt["trainer"]["hooks"]["LRPETHook"]["projector"] == {"last_iter": 2, "num_projections": 1}
    for name, lp in plan.layers.items():
        assert numerical_rank(ckpt["model"][name + ".weight"]) <= lp.rank, name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_matches_uninterrupted(run_a, toy_voc, tmp_path):
    """``--resume`` from the checkpoint after step 2 continues the schedule (projections at 4, 5 only,
    same plan, same counters) and reaches the uninterrupted run's final weights bit for bit.

    Exact because ``tools/train_det.py`` checkpoints the RNG states (``RNGStateHook``: detectron2's
    RPN/ROI samplers permute candidates with the global torch RNG) and its training loader draws
    nothing from the global RNG; the data stream is the same because every batch is (see
    ``conftest.d2_toy_voc``).
    """
    out, _ = run_a
    shutil.copy(out / "model_0000001.pth", tmp_path / "model_0000001.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    train(toy_voc, tmp_path, "--resume")
    assert projected_steps((tmp_path / "log.txt").read_text()) == [4, 5]
    ca, cb = load(out / "model_final.pth"), load(tmp_path / "model_final.pth")
    assert ca["trainer"]["hooks"]["LRPETHook"] == cb["trainer"]["hooks"]["LRPETHook"]
    a, b, start = ca["model"], cb["model"], load(out / "model_0000001.pth")["model"]
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the resumed steps did change the weights
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    plan = plan_from_checkpoint(cb)
    for name, lp in plan.layers.items():
        assert numerical_rank(b[name + ".weight"]) == lp.rank


@pytest.mark.slow
def test_hook_resume_is_exact_in_simple_trainer():
    """The hook's state makes a resumed SimpleTrainer reproduce an uninterrupted one exactly."""
    def make():
        torch.manual_seed(0)
        model = _TinyModel()
        layers = pair_convs(model).layers
        plan = build_rank_plan(layer_specs(layers, {l.name: (8, 8) for l in layers}), LRPETConfig(ratio=0.5))
        g = torch.Generator().manual_seed(1)
        data = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(9)]
        return model, LRPETHook(model, LRPETConfig(interval=3), layers=layers, plan=plan), data

    def trainer_for(model, hook, data, start):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        t = SimpleTrainer(model, iter(data[start:]), opt)
        t.register_hooks([hook])
        return t

    class Snapshot(HookBase):  # what a PeriodicCheckpointer after step 4 would save
        def after_step(self):
            if self.trainer.iter == 3:
                self.state = copy.deepcopy({"model": model.state_dict(), "trainer": self.trainer.state_dict()})

    model, hook, data = make()
    snap = Snapshot()
    t = trainer_for(model, hook, data, 0)
    t.register_hooks([snap])
    t.train(0, 8)  # projected at steps 3, 6 and 8
    full = {k: v.clone() for k, v in model.state_dict().items()}
    state = snap.state
    buf = io.BytesIO()
    torch.save(state, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # what a resumed run reads

    model, hook, data = make()
    model.load_state_dict(state["model"])
    t = trainer_for(model, hook, data, 4)
    t.load_state_dict(state["trainer"])
    assert hook.projector.last_iter == 3
    t.train(4, 8)  # steps 5..8; projected at 6 and 8
    assert hook.projector.num_projections == 3
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------- compression
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compress_tool_reports_and_saves(compressed):
    path, text = compressed
    assert re.search(r"factorised \d+ of \d+ planned convs", text)
    cut = macs_cut(text)
    assert 49.0 <= cut <= 52.0  # fvcore's count of the backbone agrees with the 50% plan
    assert 0 < macs_cut(text, "model") and "detectron2 FlopCountAnalysis" in text  # (roi_heads.res5 counts there)
    ckpt = load(path)  # plain data and tensors only
    assert isinstance(ckpt["lrpet_plan"], dict) and ckpt["lrpet_factorized"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compressed_loads_and_predicts_like_dense(run_a, compressed, toy_voc):
    """The factorised detector computes what the projected dense one computes: checked in float64 on the
    tensors before any discrete step (backbone features, RPN logits and deltas, box-head scores and deltas
    for the same proposals), so it holds on any CPU. Post-NMS detections are a smoke test only."""
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    from lrpet_dense.core import compare_outputs
    from lrpet_dense.core.verify import float64_copy
    from lrpet_dense.detectron2 import load_model, output_tensors

    out, _ = run_a
    path, _ = compressed
    # detectron2's own loading path: no missing, unexpected or mis-shaped keys
    model = build_model(toy_cfg())
    incompatible = DetectionCheckpointer(model)._load_model(load(path))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert sum(isinstance(m, FactorizedConv2d) for m in model.modules()) == len(load(path)["lrpet_factorized"])

    cfg = toy_cfg()
    dense, _ = load_model(cfg, str(out / "model_final.pth"))
    fact, _ = load_model(cfg, str(path))
    images = sorted((Path(toy_voc) / "VOC2007" / "JPEGImages").glob("2007_*.jpg"))
    for img_path in images:
        image = torch.as_tensor(read_image(str(img_path), format="BGR").copy()).permute(2, 0, 1).double()
        ref = output_tensors(float64_copy(dense), image)
        errors = compare_outputs(ref, output_tensors(float64_copy(fact), image), rtol=1e-4)
        assert {k.split(".")[0] for k in errors} == {"backbone", "rpn", "box_predictor"}
    # smoke: detectron2's predictor runs the compressed checkpoint and returns detections
    small = DefaultPredictor(toy_cfg("MODEL.WEIGHTS", str(path)))
    assert any(isinstance(m, FactorizedConv2d) for m in small.model.modules())
    instances = small(read_image(str(images[0]), format="BGR"))["instances"]
    assert len(instances) > 0 and torch.isfinite(instances.pred_boxes.tensor).all()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_only_compressed_any_meta_architecture(run_a, compressed, toy_voc, tmp_path):
    """``--eval-only`` builds the factorised model from the checkpoint's plan with the LRPET meta
    architecture and with detectron2's stock ``GeneralizedRCNN`` alike: the same computation, so the
    same AP to the last digit (the AP value itself is a smoke check)."""
    path, _ = compressed
    text = train(toy_voc, tmp_path / "lrpet", "--eval-only", "MODEL.WEIGHTS", str(path))
    assert "factorised convs" in text
    stock = train(toy_voc, tmp_path / "stock", "--eval-only", "MODEL.WEIGHTS", str(path),
                  "MODEL.META_ARCHITECTURE", "GeneralizedRCNN")
    assert "factorised convs" in stock
    ap = copypaste_ap(text)
    assert all(0.0 <= v <= 100.0 for v in ap) and copypaste_ap(stock) == ap


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mismatched_checkpoints_are_clear_errors(run_a, compressed):
    out, _ = run_a
    path, _ = compressed
    # a compressed C4 checkpoint into an FPN config
    fpn_cfg = toy_cfg(config=Path(config_path("faster_rcnn_fpn_lrpet.yaml")))
    fpn_cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "BN"])
    with pytest.raises(ValueError, match="does not match this model/config"):
        DetectionCheckpointer(build_model(fpn_cfg)).load(str(path))
    # a dense checkpoint into a model that was factorised by a compressed one
    model = build_model(toy_cfg())
    DetectionCheckpointer(model).load(str(path))
    with pytest.raises(ValueError, match="checkpoint is dense"):
        DetectionCheckpointer(model).load(str(out / "model_final.pth"))
    # factorised keys without a plan
    sd = dict(load(path)["model"])
    sd.pop("_lrpet_plan")
    with pytest.raises(ValueError, match="no LRPET plan"):
        build_model(toy_cfg()).load_state_dict(sd)
    # a checkpoint that was never projected cannot be compressed without changing its outputs
    model = build_model(toy_cfg())
    plan = plan_from_checkpoint(load(out / "model_final.pth"))
    with pytest.raises(ValueError, match="not of their planned rank"):
        compress_model_(model, plan)
