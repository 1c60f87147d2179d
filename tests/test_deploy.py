"""Deployment: BatchNorm folding (checked in float64), hardware-friendly ranks, latency-aware plans, and
ONNX export of both compressed models, run in ONNX Runtime against PyTorch. Timing stays in benchmarks:
here only correctness (a latency table is measured on a tiny model to test its plumbing, not its values)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import D2_TINY, D2_TOY_CFG, REPO, SEG_TOY_CFG

from lrpet_dense.core import ConvBN, FactorizedConv2d, LayerSpec, LRPETConfig, build_rank_plan, factorize_, lrpet_project
from lrpet_dense.core.deploy import align_ranks_, aligned_for_export, fold_bn_, to_inference_layout_, unaligned_ranks
from lrpet_dense.core.factorize import PointwiseConv2d
from lrpet_dense.core.latency import LatencyTable, measure_latency_table

pytestmark = pytest.mark.timeout(600)
CLI = Path(sys.executable).parent / "lrpet-dense"


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 8, 1))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return net.double().eval()


def test_fold_bn_into_dense_and_factorised_convs_is_exact_in_float64():
    net = _net()
    with torch.no_grad():
        net[3].weight.copy_(lrpet_project(net[3].weight, 4))
    factorize_(net, {"3": 4})
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    ref = net(x)
    layers = [ConvBN("0", net[0], net[1]), ConvBN("3", net[3], net[4]), ConvBN("6", net[6], None)]
    assert fold_bn_(net, layers) == ["0", "3"]
    assert isinstance(net[1], nn.Identity) and isinstance(net[4], nn.Identity) and isinstance(net[3], FactorizedConv2d)
    torch.testing.assert_close(net(x), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="also follows"):
        shared = nn.BatchNorm2d(16)
        fold_bn_(nn.Sequential(nn.Conv2d(3, 16, 1), shared), [ConvBN("a", nn.Conv2d(3, 16, 1), shared),
                                                              ConvBN("b", nn.Conv2d(3, 16, 1), shared)])
    keys = list(net.state_dict())
    to_inference_layout_(net)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    # the dense 1x1 conv gets the oneDNN kernel of PointwiseConv2d: same parameters; float64 takes nn.Conv2d's path
    assert type(net[6]) is PointwiseConv2d and list(net.state_dict()) == keys
    torch.testing.assert_close(net(x), ref, rtol=1e-12, atol=1e-12)


def test_pointwise_kernel_of_the_inference_layout_is_within_float32_rounding():
    """The swapped 1x1 conv's float32 oneDNN result against the float64 product: within the error bound of a
    length-K float32 dot product, ``K * u * (|W| |x| + |b|)`` (u = 2^-24), a bound and not a fitted tolerance."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 48, 1).eval()
    x = torch.randn(1, 64, 7, 9).contiguous(memory_format=torch.channels_last)
    w64, b64, x64 = conv.weight.double(), conv.bias.double(), x.double()
    exact = F.conv2d(x64, w64, b64)
    bound = F.conv2d(x64.abs(), w64.abs(), b64.abs()) * 64 * 2.0 ** -24 / (1 - 64 * 2.0 ** -24)
    to_inference_layout_(conv)
    assert type(conv) is PointwiseConv2d
    with torch.no_grad():
        fast = conv(x)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert bool(((fast.double() - exact).abs() <= bound).all())


def test_rank_multiple_rounds_ranks_down():
    specs = [LayerSpec("a", (256, 256, 3, 3), (16, 16)), LayerSpec("b", (512, 128, 1, 1), (16, 16)),
             LayerSpec("tiny", (8, 8, 3, 3), (16, 16))]
    plan = build_rank_plan(specs, LRPETConfig(ratio=0.43, rank_multiple=16))
    assert plan["a"].rank == 144 and plan["b"].rank == 64  # floor(256 * 0.57) = 145 -> 144; 72 -> 64
    assert plan["tiny"].rank == 4  # a layer narrower than the multiple keeps its rank
    cut = build_rank_plan(specs, LRPETConfig(target_macs_cut=0.4, rank_multiple=8))
    assert all(lp.rank % 8 == 0 for n, lp in cut.layers.items() if n != "tiny") and cut.reached_macs_cut >= 0.4


def _table():
    # layer "fast": factorising pays off at every rank; "slow": never faster than dense (e.g. a strided 1x1)
    return LatencyTable({
        "fast": {"dense": 10.0, "ranks": [1, 64, 128, 256], "factorized": [1.0, 3.0, 6.0, 12.0]},
        "slow": {"dense": 2.0, "ranks": [1, 64, 128, 256], "factorized": [2.5, 3.0, 3.5, 4.0]},
    })


def test_unaligned_ranks_names_the_factorised_convs_export_warns_about():
    net = nn.Sequential(FactorizedConv2d(64, 64, 3, rank=18, padding=1),  # unaligned
                        FactorizedConv2d(64, 64, 1, rank=32),              # a multiple of 16
                        FactorizedConv2d(8, 8, 1, rank=5),                 # too narrow to have an aligned rank
                        nn.Conv2d(8, 8, 1))
    assert unaligned_ranks(net, 16) == (["0"], 3)
    assert unaligned_ranks(net, 4) == (["0", "2"], 3)
    assert unaligned_ranks(nn.Conv2d(8, 8, 1)) == ([], 0)


def _mixed_ranks():
    torch.manual_seed(0)
    return nn.Sequential(FactorizedConv2d(64, 64, 3, rank=18, padding=1), nn.ReLU(),  # padded to 32
                         FactorizedConv2d(64, 48, 1, rank=32),   # a multiple of 16 already
                         FactorizedConv2d(48, 40, 1, rank=19),   # 32 would cost more than the dense conv: kept
                         FactorizedConv2d(40, 8, 1, rank=5))     # narrower than 16: kept


def test_align_ranks_pads_with_zeros_and_keeps_the_outputs():
    net = _mixed_ranks().double().eval()
    assert unaligned_ranks(net, 16, paddable=True) == (["0"], 4)
    x = torch.randn(2, 64, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
    keys = list(net.state_dict())
    assert align_ranks_(net, 16) == ["0"]
    assert [m.rank for m in net if isinstance(m, FactorizedConv2d)] == [32, 32, 19, 5]
    a, b = net[0].conv_a, net[0].conv_b
    assert a.weight.shape == (32, 64, 3, 3) and b.weight.shape == (64, 32, 1, 1) and a.out_channels == b.in_channels == 32
    assert not a.weight[18:].any() and not b.weight[:, 18:].any() and list(net.state_dict()) == keys
    with torch.no_grad():  # the same sums plus zero terms: equal up to float64 summation order
        torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    assert unaligned_ranks(net, 16) == (["3"], 4)  # the one padding would not pay for
    assert unaligned_ranks(net, 16, paddable=True) == ([], 4)
    assert align_ranks_(net, 16) == []  # idempotent
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="integer >= 1"):
            align_ranks_(net, bad)
        with pytest.raises(ValueError, match="integer >= 1"):
            aligned_for_export(net, bad)


def test_aligned_for_export_pads_a_copy_in_the_inference_layout():
    net = to_inference_layout_(_mixed_ranks().eval())
    same, names = aligned_for_export(net, 1)
    assert same is net and names == []
    padded, names = aligned_for_export(net, 16)
    assert padded is not net and names == ["0"] and net[0].rank == 18  # the model given is untouched
    assert padded[0].conv_a.weight.is_contiguous(memory_format=torch.channels_last)
    assert padded[0].conv_a.weight.requires_grad and padded[0].conv_b.weight.requires_grad  # still Parameters
    plain = nn.Sequential(FactorizedConv2d(64, 64, 1, rank=32))
    assert aligned_for_export(plain, 16) == (plain, [])


def test_export_aligned_checks_the_padded_file_against_the_unpadded_model(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import lrpet_dense.core.deploy as deploy
    from lrpet_dense.core.export import export_aligned

    net = _mixed_ranks().eval()
    x = torch.randn(1, 64, 9, 9, generator=torch.Generator().manual_seed(0))
    out = export_aligned(net, lambda m: m, (x,), str(tmp_path / "ok.onnx"), dynamo=False)
    assert out["aligned"] == ["0"] and (tmp_path / "ok.onnx").exists() and net[0].rank == 18
    real = deploy._zero_padded  # a padding that changes the layer must not reach a file
    monkeypatch.setattr(deploy, "_zero_padded", lambda w, dim, size: nn.Parameter(real(w, dim, size).detach() + 0.5))
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_aligned(net, lambda m: m, (x,), str(tmp_path / "bad.onnx"), dynamo=False)
    assert not (tmp_path / "bad.onnx").exists() and net[0].rank == 18


def test_export_aligned_leaves_internal_outputs_out_of_the_file(tmp_path):
    """Outputs the check needs (a detector's tensors before each discrete step) are checked, then left out of the
    file written: the same nodes, fewer outputs, the same values in ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    import onnx

    from lrpet_dense.core.export import export_aligned, run_onnx

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.main, self.side = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.body(x).relu()
            return self.main(y), self.body(x), self.side(y)  # the side head is needed only by its output

    torch.manual_seed(0)
    net, x = TwoHeads().eval(), torch.randn(1, 3, 9, 9)
    seen = []
    out = export_aligned(net, lambda m: m, (x,), str(tmp_path / "m.onnx"), dynamo=False, internal_outputs=2,
                         compare=lambda module, outs, ref: seen.append(len(outs)) or {})
    assert seen == [3] and len(out["reference"]) == 1
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert len(graph.output) == 1 and len(graph.node) == 3  # Conv, Relu, Conv: the side head's Conv is gone
    assert not any("side" in t.name for t in graph.initializer)
    (y,) = run_onnx(str(tmp_path / "m.onnx"), [x])
    torch.testing.assert_close(torch.as_tensor(y), out["reference"][0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="internal_outputs=3"):
        export_aligned(net, lambda m: m, (x,), str(tmp_path / "n.onnx"), dynamo=False, internal_outputs=3)


def _selection(*rows):
    boxes = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    return boxes, torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])


def test_detection_check_accepts_any_tie_order_of_greedy_nms_and_nothing_else():
    """The exported detector's selections (proposals, detections) are checked as a greedy NMS + top-k of the same
    candidates could make them for some order of tied scores: ONNX Runtime and PyTorch may break exact ties
    (saturated scores of 1.0) differently, and a file that keeps, drops or invents a box is refused."""
    pytest.importorskip("detectron2")
    from lrpet_dense.detectron2.onnx import check_selection

    a, b = ([0, 0, 10, 10], 1.0, 0), ([1, 0, 11, 10], 1.0, 0)  # IoU 0.82, tied scores
    c, d, e = ([50, 50, 60, 60], 0.9, 0), ([0, 0, 10, 10], 0.8, 1), ([80, 80, 90, 90], 0.05, 1)
    candidates = _selection(a, b, c, d, e)

    def check(*found, topk=100, groups=True):
        boxes, scores, classes = _selection(*found)
        return check_selection((boxes, scores, classes if groups else None), candidates, "detection", iou=0.5,
                                topk=topk, floor=0.05)

    assert check(a, c, d) == 0.0 and check(b, c, d) == 0.0  # either tie order; e is at the score floor
    assert check(d, c, a) == 0.0 and check(b, c, d, groups=False) == 0.0  # any order; groups from the candidates
    assert check(a, c, topk=2) == 0.0  # d and e cut by the top 2
    for found, topk, match in (((a, b, c, d), 100, "overlapping"), ((a, d), 100, "drops .* candidate 2"),
                               ((a, c), 100, "drops .* candidate 3"), ((a, d), 2, "drops .* candidate 2"),
                               ((a, c, d, ([30, 30, 40, 40], 0.9, 0)), 100, "not among"),
                               ((a, c, ([0, 0, 10, 10], 0.8, 0)), 100, "not among")):
        with pytest.raises(ValueError, match=match):
            check(*found, topk=topk)
    moved = ([0, 0, 10, 10.5], 1.0, 0)
    with pytest.raises(ValueError, match="not among"):
        check(moved, c, d)


def test_latency_plan_cuts_measured_latency_and_leaves_slow_layers_dense():
    specs = [LayerSpec("fast", (256, 256, 3, 3), (8, 8)), LayerSpec("slow", (256, 256, 3, 3), (8, 8))]
    plan = build_rank_plan(specs, LRPETConfig(target_latency_cut=0.3), latency=_table())
    assert plan.left_dense == ["slow"] and list(plan.layers) == ["fast"]
    assert plan.latency["reached"] >= 0.3 and plan.latency["target"] == 0.3 and plan.latency["dense_ms"] == 12.0
    # the smallest grid ratio that reaches it: one step less does not
    k = plan["fast"].rank
    assert 12.0 - (2.0 + _table().factorized_ms("fast", k)) >= 0.3 * 12.0
    assert "measured latency cut" in plan.format_table()
    with pytest.raises(ValueError, match="latency table"):
        build_rank_plan(specs, LRPETConfig(target_latency_cut=0.3))
    # a MAC plan with a table reports its latency cut too
    assert "reached" in build_rank_plan(specs, LRPETConfig(ratio=0.5), latency=_table()).latency


def test_latency_table_measured_once_and_cached(tmp_path):
    convs = [nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 1)]
    layers = [ConvBN(f"c{i}", c, None) for i, c in enumerate(convs)]
    cache = tmp_path / "table.json"
    table = measure_latency_table(layers, {"c0": (8, 8), "c1": (8, 8)}, step=8, repeats=2, cache=str(cache))
    assert set(table.layers) == {"c0", "c1"} and table.layers["c0"]["ranks"][-1] == 32
    assert all(t > 0 for t in table.layers["c0"]["factorized"]) and table.dense_ms("c1") > 0
    data = json.loads(cache.read_text())
    again = measure_latency_table(layers, {"c0": (8, 8), "c1": (8, 8)}, step=8, repeats=2, cache=str(cache))
    assert again.layers == table.layers and data["meta"]["key"] == again.meta["key"]  # reused, not re-measured
    other = measure_latency_table(layers[:1], {"c0": (8, 8)}, step=8, repeats=2, cache=str(cache))
    assert set(other.layers) == {"c0"}  # other layers: measured again


# =============================================================================== the frameworks
def _run(args, env=None):
    proc = subprocess.run([str(a) for a in args], cwd=REPO, env=dict(os.environ, **(env or {})), capture_output=True,
                          text=True, timeout=500)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_detectron2_inference_form_and_onnx(d2_small_ckpts, d2_toy_voc, tmp_path):
    pytest.importorskip("onnxruntime")
    from detectron2.config import get_cfg

    from lrpet_dense.detectron2 import add_lrpet_config, load_model, to_inference_

    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(D2_TOY_CFG))
    cfg.merge_from_list(list(D2_TINY))
    model, _ = load_model(cfg, str(d2_small_ckpts[0]))
    to_inference_(model)  # raises if the folded detector's pre-NMS outputs differ (float64)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d,)) or type(m).__name__ == "FrozenBatchNorm2d"]
    assert not norms and model.backbone.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    from detectron2.layers import Conv2d as D2Conv2d

    pointwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                 and m.stride == (1, 1) and m.groups == 1 and type(m) is not PointwiseConv2d
                 and not (isinstance(m, D2Conv2d) and m.activation is not None)]
    assert not pointwise, "every unstrided 1x1 conv of the folded detector runs on the oneDNN kernel"

    out = tmp_path / "det.onnx"
    code, text = _run([CLI, "export", "det", "--config", D2_TOY_CFG, "--checkpoint", d2_small_ckpts[0], "--output", out,
                       *D2_TINY], {"LRPET_TOY_VOC": d2_toy_voc})
    assert code == 0, text[-3000:]
    assert out.exists() and "ONNX Runtime vs PyTorch" in text


@pytest.mark.slow
def test_detectron2_compressed_traces_with_tracing_adapter(d2_small_ckpts):
    from detectron2.config import get_cfg
    from detectron2.export import TracingAdapter

    from lrpet_dense.detectron2 import add_lrpet_config, load_model

    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(D2_TOY_CFG))
    cfg.merge_from_list(list(D2_TINY))
    model, _ = load_model(cfg, str(d2_small_ckpts[0]))
    image = torch.rand(3, 96, 128) * 255
    adapter = TracingAdapter(model, [{"image": image}], lambda m, i: [{"instances": m.inference(i, do_postprocess=False)[0]}])
    traced = torch.jit.trace(adapter.eval(), (image,))
    with torch.no_grad():
        assert len(traced(image)) == len(adapter(image))


@pytest.mark.slow
def test_mmseg_inference_form_onnx_and_torch_export(seg_small_ckpts, tmp_path):
    pytest.importorskip("onnxruntime")
    from unittest import mock

    from mmengine.config import Config

    import lrpet_dense.mmseg as lm

    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(tmp_path)}):
        cfg = Config.fromfile(str(SEG_TOY_CFG))
    model, _ = lm.load_model(cfg, str(seg_small_ckpts[0]))
    lm.to_inference_(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    class TensorMode(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, mode="tensor")

    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(TensorMode(model).eval(), (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x, mode="tensor"), rtol=1e-4, atol=1e-5)

    out = tmp_path / "seg.onnx"
    code, text = _run([CLI, "export", "seg", SEG_TOY_CFG, seg_small_ckpts[0], out, "--input-size", "64", "64"],
                      {"LRPET_TOY_VOC_ROOT": str(tmp_path)})
    assert code == 0, text[-3000:]
    assert out.exists() and "ONNX Runtime vs PyTorch" in text


@pytest.mark.slow
def test_detectron2_export_refuses_a_graph_that_differs_at_any_stage(tmp_path, monkeypatch):
    """The detector's export check, stage by stage: a graph whose convs, NMS or top-k are not the model's is
    refused and no file is written (here the exported copy is altered behind the check's back)."""
    pytest.importorskip("onnxruntime")
    import copy

    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import lrpet_dense.core.deploy as deploy
    import lrpet_dense.detectron2 as ld

    cfg = get_cfg()
    ld.add_lrpet_config(cfg)
    cfg.merge_from_file(str(D2_TOY_CFG))
    cfg.merge_from_list(list(D2_TINY))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    result = ld.export_onnx(model, str(tmp_path / "ok.onnx"), (96, 128))
    assert set(result["check"]) == {"rpn_head", "proposals_px", "box_predictor", "detections_px"}
    assert (tmp_path / "ok.onnx").exists() and result["outputs"] == 4  # boxes, classes, scores, image size

    def objectness(m):
        m.proposal_generator.rpn_head.objectness_logits.bias.data += 0.01

    def res5(m):
        m.roi_heads.res5[0].conv1.weight.data *= 1.01

    def nms(m):
        m.roi_heads.box_predictor.test_nms_thresh = 0.99

    def topk(m):
        m.roi_heads.box_predictor.test_topk_per_image = 3

    for alter, match in ((objectness, "the RPN head"), (res5, "the box predictor"), (nms, "overlapping"),
                         (topk, "drops")):
        def altered(m, multiple, alter=alter):
            m = copy.deepcopy(m)
            alter(m)
            return m, []

        monkeypatch.setattr(deploy, "aligned_for_export", altered)
        with pytest.raises(ValueError, match=match):
            ld.export_onnx(model, str(tmp_path / f"{alter.__name__}.onnx"), (96, 128))
        assert not (tmp_path / f"{alter.__name__}.onnx").exists()
    model.roi_heads.mask_on = True  # masks: outputs the check would not cover
    with pytest.raises(ValueError, match="mask_on"):
        ld.export_onnx(model, str(tmp_path / "masks.onnx"), (96, 128))


@pytest.mark.slow
def test_export_pads_unaligned_ranks_and_checks_the_file_against_the_model_given(tmp_path):
    """Both adapters' export: ranks 25 (not multiples of 16) are padded in the file, whose outputs ONNX Runtime
    checks against the unpadded model's; the model given keeps its ranks. Ratio 0.6 of the toy widths (64 -> 25)."""
    pytest.importorskip("onnxruntime")
    from unittest import mock

    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import lrpet_dense.detectron2 as ld
    import lrpet_dense.mmseg as lm
    from lrpet_dense.core import project_

    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(tmp_path)}):
        seg_cfg = Config.fromfile(str(SEG_TOY_CFG))
    init_default_scope("mmseg")
    torch.manual_seed(0)
    seg = MODELS.build(seg_cfg.model).eval()
    det_cfg = get_cfg()
    ld.add_lrpet_config(det_cfg)
    det_cfg.merge_from_file(str(D2_TOY_CFG))
    det_cfg.merge_from_list(list(D2_TINY))
    det = build_model(det_cfg).eval()
    for adapter, model, hw, name in ((lm, seg, (64, 64), "backbone.layer1.0.conv2"),
                                     (ld, det, (96, 128), "backbone.res2.0.conv2")):
        config = LRPETConfig(ratio=0.6, include=(name,), include_frozen=True)
        layers = adapter.pair_convs(model, config).layers
        plan = adapter.build_plan(model, layers, config)
        project_(layers, plan)
        assert adapter.compress_model_(model, plan) == [layers[0].name]
        adapter.to_inference_(model)
        assert unaligned_ranks(model, 16) == ([layers[0].name], 1)
        result = adapter.export_onnx(model, str(tmp_path / "m.onnx"), hw)
        assert result["aligned"] == [layers[0].name] and result["check"]
        assert unaligned_ranks(model, 16) == ([layers[0].name], 1)  # padded in the file only
        assert adapter.export_onnx(model, str(tmp_path / "m1.onnx"), hw, align_ranks=1)["aligned"] == []
