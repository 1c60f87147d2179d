"""The core's maths checked against its definitions (METHOD.md sections 2, 3, 5)."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from lrpet_dense.core import (ConvBN, FactorizedConv2d, LayerSpec, LRPETConfig, LRPETProjector, RankPlan,
                              build_rank_plan, factorize_, lrpet_project, project_, rank_from_ratio)
from lrpet_dense.core.macs import conv_macs, factorization_saves, factorized_macs
from lrpet_dense.core.projection import bn_scale, compute_projection
from lrpet_dense.core.rank import select_names

C = LRPETConfig

pytestmark = pytest.mark.timeout(120)


def exact_ref(w, k, a=None, et=True, ridge=1e-5, r=0.0):
    """float64 textbook LRPET via full SVD."""
    M = w.reshape(w.shape[0], -1).double()
    if a is not None:
        M = M * a.double()[:, None]
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    Mk = (U[:, :k] * S[:k]) @ Vh[:k]
    if et:
        alpha = torch.sqrt(((S ** 2).sum() - r ** 2 * (S[k:] ** 2).sum()) / (S[:k] ** 2).sum())
        Mk = alpha * Mk
    out = Mk + r * (M - (U[:, :k] * S[:k]) @ Vh[:k])
    if a is not None:
        a = a.double()
        out = out * (a / (a * a + ridge))[:, None]
    return out.reshape(w.shape)


def rank_of(w):
    """Numerical rank at the precision of ``w``'s dtype (float32 round-off leaves ~1e-7 tails)."""
    rtol = 1e-10 if w.dtype == torch.float64 else 1e-5
    return torch.linalg.matrix_rank(w.detach().reshape(w.shape[0], -1).double(), rtol=rtol).item()


# --- rank rule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("m,p,k", [(64, 0.25, 48), (10, 0.1, 9), (100, 0.29, 71), (3, 0.999, 1), (7, 0.0, 7),
                                   (1, 0.5, 1), (512, 0.5, 256), (2048, 0.62, 778)])
def test_rank_rule_exact_floor(m, p, k):
    assert rank_from_ratio(m, p) == k


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_rank_rule_rejects_bad_ratio(p):
    with pytest.raises(ValueError, match="ratio"):
        rank_from_ratio(64, p)


def test_rank_rule_rejects_bad_full_rank():
    with pytest.raises(ValueError, match="full_rank"):
        rank_from_ratio(0, 0.5)


# --- plan and solver -----------------------------------------------------------------------------
SPECS = [LayerSpec("a.conv1", (64, 64, 3, 3), (32, 32)), LayerSpec("a.conv2", (256, 64, 1, 1), (32, 32)),
         LayerSpec("b.conv1", (128, 256, 3, 3), (16, 16)), LayerSpec("b.conv2", (512, 128, 1, 1), (16, 16))]


def test_plan_ratio_and_overrides():
    plan = build_rank_plan(SPECS, C(ratio=0.25, overrides={"b.*": 0.5}))
    assert plan.ranks == {"a.conv1": 48, "a.conv2": 48, "b.conv1": 64, "b.conv2": 64}
    assert plan["b.conv1"].ratio == 0.5


def test_plan_round_trip_plain_data(tmp_path):
    plan = build_rank_plan(SPECS, C(target_macs_cut=0.4, overrides={"a.conv2": 0.1}), reference_macs=None)
    d = plan.to_dict()
    torch.save({"plan": d}, tmp_path / "p.pth")
    back = RankPlan.from_dict(torch.load(tmp_path / "p.pth", weights_only=True)["plan"])
    assert back.ranks == plan.ranks and back.ratio == plan.ratio
    assert back.reached_macs_cut == pytest.approx(plan.reached_macs_cut)
    plan.to_json(str(tmp_path / "p.json"))
    assert RankPlan.from_json(str(tmp_path / "p.json")).ranks == plan.ranks
    assert "a.conv1" in plan.format_table()


def _cut(specs, p, ref=None):
    before = after = 0
    for s in specs:
        k = rank_from_ratio(s.full_rank, p)
        dense = conv_macs(s.shape, s.out_hw)
        before += dense
        after += factorized_macs(s.shape, k, s.out_hw) if factorization_saves(s.shape, k) else dense
    return (before - after) / (ref or before)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_mac_solver_smallest_ratio_reaching_target(target):
    plan = build_rank_plan(SPECS, C(target_macs_cut=target))
    # recomputed from the definition, independently of the plan object
    assert _cut(SPECS, plan.ratio) >= target
    assert _cut(SPECS, plan.ratio - 1e-4) < target  # smallest on the 1e-4 grid
    assert plan.reached_macs_cut == pytest.approx(_cut(SPECS, plan.ratio))


def test_mac_solver_reference_macs_and_unreachable():
    ref = 4 * sum(conv_macs(s.shape, s.out_hw) for s in SPECS)
    plan = build_rank_plan(SPECS, C(target_macs_cut=0.1), reference_macs=ref)
    assert _cut(SPECS, plan.ratio, ref) >= 0.1
    with pytest.raises(ValueError, match="cannot be reached"):
        build_rank_plan(SPECS, C(target_macs_cut=0.5), reference_macs=ref)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=1.0), "ratio"), (dict(ratio=0.5, target_macs_cut=0.3), "not several"),
    (dict(target_macs_cut=1.2), "target_macs_cut"), (dict(ratio=0.5, overrides={"zzz*": 0.3}), "matches no"),
    (dict(ratio=0.5, overrides={"a.*": -0.3}), "overrides"), (dict(rank_policy="energy"), "target_macs_cut"),
])
def test_plan_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_rank_plan(SPECS, C(**kwargs))


def test_plan_default_ratio_and_zero_cut_is_off():
    assert build_rank_plan(SPECS).ratio == 0.5 == build_rank_plan(SPECS, C(target_macs_cut=0)).ratio


def test_select_names():
    names = ["backbone.stem.conv1", "backbone.res2.0.conv1", "roi_heads.res5.0.conv1"]
    assert select_names(names, ["backbone.*"], ["*stem*"]) == ["backbone.res2.0.conv1"]
    with pytest.raises(ValueError, match="matches no candidate"):
        select_names(names, ["backbone.res9*"])


# --- one projection ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,k", [((64, 32, 3, 3), 16), ((256, 64, 1, 1), 40), ((48, 300), 47), ((8, 8, 1, 1), 1)])
def test_projected_rank_is_k_and_matches_reference(shape, k):
    torch.manual_seed(0)
    w = torch.randn(shape)
    w0 = w.clone()
    out = lrpet_project(w, k)
    assert torch.equal(w, w0)  # input untouched
    assert out.shape == w.shape and out.dtype == w.dtype
    assert rank_of(out) == k
    torch.testing.assert_close(out.double(), exact_ref(w, k), rtol=0, atol=1e-5 * w.norm().item())


def test_energy_transfer_keeps_norm_and_plain_lrp_loses_it():
    torch.manual_seed(1)
    w = torch.randn(96, 40, 3, 3, dtype=torch.float64)
    et = lrpet_project(w, 20)
    lrp = lrpet_project(w, 20, config=C(energy_transfer=False))
    assert et.norm().item() == pytest.approx(w.norm().item(), rel=1e-12)
    assert lrp.norm().item() < w.norm().item() * 0.99


def test_eckart_young_no_random_rank_k_matrix_is_closer():
    torch.manual_seed(2)
    w = torch.randn(32, 50, dtype=torch.float64)
    k = 8
    best = (lrpet_project(w, k, config=C(energy_transfer=False)) - w).norm()
    for _ in range(200):
        cand = torch.randn(32, k, dtype=torch.float64) @ torch.randn(k, 50, dtype=torch.float64)
        # scale each candidate optimally, then compare
        c = (cand * w).sum() / (cand * cand).sum()
        assert (c * cand - w).norm() >= best
    # also against perturbations of the optimum itself
    opt = lrpet_project(w, k, config=C(energy_transfer=False))
    U, S, Vh = torch.linalg.svd(opt)
    for _ in range(50):
        pert = (U[:, :k] + 1e-3 * torch.randn(32, k, dtype=torch.float64)) @ torch.diag(S[:k]) @ Vh[:k]
        assert (pert - w).norm() >= best


def test_bnr_all_ones_scale_equals_no_bnr_up_to_ridge():
    torch.manual_seed(3)
    w = torch.randn(64, 16, 3, 3, dtype=torch.float64)
    a = torch.ones(64, dtype=torch.float64)
    torch.testing.assert_close(lrpet_project(w, 10, bn_scale=a, config=C(ridge=0.0)), lrpet_project(w, 10))
    torch.testing.assert_close(lrpet_project(w, 10, bn_scale=a, config=C(ridge=1e-5)), lrpet_project(w, 10) / (1 + 1e-5))


@pytest.mark.parametrize("ridge", [0.0, 1e-5])
def test_bnr_folded_weight_is_et_projection_of_folded_weight(ridge):
    torch.manual_seed(4)
    w = torch.randn(64, 16, 3, 3, dtype=torch.float64)
    a = torch.rand(64, dtype=torch.float64) * 2 + 0.1
    out = lrpet_project(w, 12, bn_scale=a, config=C(ridge=ridge))
    folded_out = out * a[:, None, None, None]
    expected = lrpet_project(w * a[:, None, None, None], 12)
    # D W' = D a/(a^2+l) M' = a^2/(a^2+l) M'
    shrink = (a * a / (a * a + ridge))[:, None, None, None]
    torch.testing.assert_close(folded_out, expected * shrink)
    assert rank_of(out) == 12
    torch.testing.assert_close(out, exact_ref(w, 12, a, ridge=ridge))


def test_bnr_float32_against_reference():
    torch.manual_seed(5)
    w = torch.randn(256, 128, 3, 3)
    a = torch.rand(256) + 0.5
    out = lrpet_project(w, 80, bn_scale=a)
    ref = exact_ref(w, 80, a)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("r", [0.0, 0.3, 1.0])
def test_residual_factor(r):
    torch.manual_seed(6)
    w = torch.randn(40, 60, dtype=torch.float64)
    out = lrpet_project(w, 10, config=C(residual=r))
    torch.testing.assert_close(out, exact_ref(w, 10, r=r))
    assert out.norm().item() == pytest.approx(w.norm().item(), rel=1e-12)  # energy kept with residual too
    if r == 1.0:
        torch.testing.assert_close(out, w)


def test_full_rank_is_identity_and_zero_weight_left_alone():
    w = torch.randn(16, 8, 3, 3)
    assert torch.equal(lrpet_project(w, 16), w)
    z = torch.zeros(16, 8, 3, 3)
    out = lrpet_project(z, 4)
    assert torch.equal(out, z)


def test_energy_kept_reported():
    torch.manual_seed(7)
    w = torch.randn(64, 64, dtype=torch.float64)
    a = torch.rand(64, dtype=torch.float64) + 0.5
    _, kept = compute_projection(w, 20, a, C())
    S = torch.linalg.svdvals(w * a[:, None])
    assert kept == pytest.approx(((S[:20] ** 2).sum() / (S ** 2).sum()).item(), rel=1e-9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank"), (dict(rank=17), "rank"), (dict(rank=2.5), "rank"),
    (dict(rank=4, bn_scale=torch.ones(15)), "15 channels"),
    (dict(rank=4, bn_scale=torch.tensor([float("nan")] * 16)), "NaN/Inf"),
    (dict(rank=4, config=dict(ridge=-1.0)), "ridge"), (dict(rank=4, config=dict(residual=1.5)), "residual"),
    (dict(rank=4, bn_scale=torch.zeros(16), config=dict(ridge=0.0)), "ridge"),
])
def test_projection_bad_input(kwargs, match):
    w = torch.randn(16, 4, 3, 3)
    with pytest.raises(ValueError, match=match):
        if "config" in kwargs:
            kwargs = dict(kwargs, config=C(**kwargs["config"]))
        lrpet_project(w, **kwargs)


def test_projection_rejects_nan_weight():
    w = torch.randn(16, 4, 3, 3)
    w[3, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        lrpet_project(w, 4)


# --- whole model, atomic -------------------------------------------------------------------------
def _net():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 8, 1))
    for bn in (net[1], net[4]):
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return net


def _pairs(net):
    return [ConvBN("0", net[0], net[1]), ConvBN("3", net[3], net[4]), ConvBN("6", net[6], None)]


def test_project_layers_in_place_with_stats():
    net = _net()
    params_before = [id(p) for p in net.parameters()]
    olds = [net[i].weight.detach().clone() for i in (0, 3, 6)]
    stats = project_(_pairs(net), {"0": 6, "3": 10, "6": 4})
    assert [id(p) for p in net.parameters()] == params_before  # same Parameter objects
    assert [s.name for s in stats] == ["0", "3", "6"]
    for (i, k), old, s in zip([(0, 6), (3, 10), (6, 4)], olds, stats):
        assert rank_of(net[i].weight) == k and s.rank == k
        assert 0 < s.energy_kept < 1
        assert s.rel_change == pytest.approx(((net[i].weight - old).norm() / old.norm()).item(), rel=1e-5)
    torch.testing.assert_close(net[3].weight.detach().double(),
                               exact_ref(olds[1], 10, bn_scale(net[4])), rtol=0, atol=1e-5)


def test_project_layers_atomic_on_failure():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net[6].weight[0, 0, 0, 0] = float("nan")
    before["6.weight"] = net[6].weight.detach().clone()
    with pytest.raises(ValueError, match="'6'"):
        project_(_pairs(net), {"0": 6, "3": 10, "6": 4})
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) or (torch.isnan(v).any() and k == "6.weight"), k
    # a BN with the wrong channel count: error names the layer, nothing written
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = [ConvBN("0", net[0], net[1]), ConvBN("3", net[3], nn.BatchNorm2d(31))]
    with pytest.raises(ValueError, match="'3'.*31 channels"):
        project_(bad, {"0": 6, "3": 10})
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_project_layers_bad_plan_and_groups():
    net = _net()
    with pytest.raises(ValueError, match="not found"):
        project_(_pairs(net), {"9": 3})
    g = nn.Conv2d(8, 8, 3, groups=4)
    with pytest.raises(ValueError, match="groups=4"):
        project_([ConvBN("g", g, None)], {"g": 1})


def test_bn_stats_nan_is_error():
    net = _net()
    net[1].running_var[2] = float("nan")
    with pytest.raises(ValueError, match="'0'.*NaN/Inf"):
        project_(_pairs(net), {"0": 6})


# --- factorised conv -----------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 2, (2, 1)])
@pytest.mark.parametrize("padding,dilation", [(0, 1), (1, 1), (2, 2), ((1, 3), (1, 3))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel", [3, (1, 3), (3, 1), 1])
def test_factorized_conv_equals_dense_rank_k_conv(stride, padding, dilation, bias, kernel):
    torch.manual_seed(9)
    conv = nn.Conv2d(12, 20, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    with torch.no_grad():
        conv.weight.copy_(lrpet_project(conv.weight, 5))
    f = FactorizedConv2d.from_conv(conv, 5)
    assert f.conv_a.stride == conv.stride and f.conv_a.padding == conv.padding
    assert f.conv_a.dilation == conv.dilation and (f.conv_b.bias is not None) == bias
    x = torch.randn(2, 12, 13, 11, dtype=torch.float64)
    torch.testing.assert_close(f(x), conv(x))



@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (1, 2, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_factorized_conv_float32_fast_paths_equal_dense(kernel, stride, padding, channels_last, bias):
    """The 1x1 convs' CPU inference kernel (oneDNN on channels_last inputs) gives the dense result in
    both layouts, and autograd still works."""
    from lrpet_dense.core.factorize import PointwiseConv2d

    torch.manual_seed(3)
    conv = nn.Conv2d(16, 24, kernel, stride=stride, padding=padding, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(lrpet_project(conv.weight, 6))
    f = FactorizedConv2d.from_conv(conv, 6)
    assert isinstance(f.conv_b, PointwiseConv2d)
    assert isinstance(f.conv_a, PointwiseConv2d) == (kernel == 1 and stride == 1)
    x = torch.randn(3, 16, 10, 9)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    f, conv, x = f.to(memory_format=fmt), conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    with torch.inference_mode():
        ref = conv(x)
        torch.testing.assert_close(f(x), ref, rtol=1e-4, atol=1e-5)
    xg = x.clone().requires_grad_()
    out = f(xg)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert xg.grad is not None and f.conv_b.weight.grad is not None

def test_factorized_conv_padding_mode_and_rejections():
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect").double()
    with torch.no_grad():
        conv.weight.copy_(lrpet_project(conv.weight, 2))
    f = FactorizedConv2d.from_conv(conv, 2)
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(f(x), conv(x))
    with pytest.raises(ValueError, match="groups"):
        FactorizedConv2d.from_conv(nn.Conv2d(4, 8, 3, groups=2), 2)
    with pytest.raises(ValueError, match="rank"):
        FactorizedConv2d.from_conv(nn.Conv2d(4, 8, 1), 5)


def test_factorize_model_only_where_it_saves_and_rebuild_loads():
    net = _net().eval()
    plan = {"3": 4, "6": 8}  # "6": 8 x (32 + 8) >= 8 x 32: not worth it
    project_(_pairs(net), plan)
    x = torch.randn(2, 3, 9, 9)
    ref = net(x)
    names = factorize_(net, plan)
    assert names == ["3"] and isinstance(net[3], FactorizedConv2d) and isinstance(net[6], nn.Conv2d)
    torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-5)
    fresh = _net().eval()
    assert factorize_(fresh, plan, from_weights=False) == ["3"]
    fresh.load_state_dict(net.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), ref, rtol=1e-4, atol=1e-5)


def test_factorize_atomic_and_plan_mismatch():
    net = _net()
    with pytest.raises(ValueError, match="not in the model"):
        factorize_(net, {"3": 4, "99": 2})
    assert isinstance(net[3], nn.Conv2d)  # nothing swapped
    plan = build_rank_plan([LayerSpec("3", (32, 16, 1, 1))], C(ratio=0.5))
    with pytest.raises(ValueError, match="differs from the plan"):
        factorize_(net, plan)


def test_macs():
    assert conv_macs((64, 32, 3, 3), (10, 10)) == 64 * 32 * 9 * 100
    assert factorized_macs((64, 32, 3, 3), 8, (10, 10)) == 8 * (32 * 9 + 64) * 100
    assert factorization_saves((64, 64, 1, 1), 31) and not factorization_saves((64, 64, 1, 1), 32)


# --- schedule ------------------------------------------------------------------------------------
def test_projector_schedule_and_state():
    p = LRPETProjector(C(interval=3, begin=4))
    assert [s for s in range(1, 12) if p.should_project(s, is_last=(s == 11))] == [6, 9, 11]
    net = _net()
    summary = p.project_(_pairs(net), build_rank_plan(
        [LayerSpec("0", (16, 3, 3, 3)), LayerSpec("3", (32, 16, 3, 3))], C(ratio=0.5)), 6)
    assert set(summary.scalars()) == {"lrpet/time_s", "lrpet/energy_kept_mean", "lrpet/energy_kept_min",
                                      "lrpet/rel_change_mean", "lrpet/rel_change_max"}
    assert 0 < summary.scalars()["lrpet/energy_kept_min"] <= 1
    q = LRPETProjector(C(interval=3, begin=4))
    q.load_state_dict(p.state_dict())
    assert not q.should_project(6, is_last=True) and q.num_projections == 1
    for bad in (dict(interval=0), dict(interval=-2), dict(interval=2, begin=-1), dict(interval=1, ridge=-1)):
        with pytest.raises(ValueError):
            LRPETProjector(C(**bad))


def test_import_does_not_pull_frameworks():
    code = ("import sys, lrpet_dense, lrpet_dense.core, lrpet_dense.data.toy_voc, lrpet_dense.configs, lrpet_dense.cli\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('detectron2', 'mmseg', 'mmcv', 'mmengine')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_project_layers_same_result_for_any_thread_count(threads):
    """Layers run on a thread pool with one BLAS thread each: the result must not depend on the
    thread count, and the global thread setting comes back."""
    before = torch.get_num_threads()
    ref_net = _net()
    torch.set_num_threads(1)
    try:
        project_(_pairs(ref_net), {"0": 6, "3": 10, "6": 4})
        net = _net()
        torch.set_num_threads(threads)
        project_(_pairs(net), {"0": 6, "3": 10, "6": 4})
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for i in (0, 3, 6):
        assert torch.equal(net[i].weight, ref_net[i].weight), i


def test_project_layers_threaded_failure_names_first_layer_and_restores_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        net = _net()
        with torch.no_grad():
            net[3].weight[0, 0, 0, 0] = float("inf")
            net[6].weight[0, 0, 0, 0] = float("nan")
        snapshot = {k: v.clone() for k, v in net.state_dict().items()}
        with pytest.raises(ValueError, match="layer '3'"):
            project_(_pairs(net), {"0": 6, "3": 10, "6": 4})
        assert torch.get_num_threads() == 2
        for k, v in net.state_dict().items():
            assert torch.equal(v, snapshot[k]) or k in ("3.weight", "6.weight"), k
        assert torch.equal(net[0].weight, snapshot["0.weight"])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("residual", [0.0, 0.3])
def test_layer_projections_reuse_no_buffer_between_layers(threads, residual):
    """Per-thread scratch buffers are reused from layer to layer: every result must still equal the
    layer projected on its own, own its storage, and survive the next call unchanged. The mix covers
    the kept-basis and dropped-basis paths, BNR, a full-rank entry and an all-zero weight with BN."""
    from lrpet_dense.core.projection import compute_layer_projections

    torch.manual_seed(3)
    convs = [nn.Conv2d(24, 24, 3, bias=False) for _ in range(5)] + [nn.Conv2d(24, 48, 1, bias=False)]
    bns = [nn.BatchNorm2d(c.out_channels) for c in convs]
    for bn in bns:
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    with torch.no_grad():
        convs[4].weight.zero_()
    layers = [ConvBN(str(i), c, bns[i] if i % 2 == 0 else None) for i, c in enumerate(convs)]
    plan = {"0": 5, "1": 20, "2": 24, "3": 12, "4": 7, "5": 17}  # k < m/2, k > m/2, full rank, ...
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = compute_layer_projections(layers, plan, C(residual=residual))
        kept = [new.clone() for _, new, _ in results]
        compute_layer_projections(layers[::-1], plan, C(residual=residual))  # reuses the buffers again
        torch.set_num_threads(1)
        alone = [lrpet_project(l.conv.weight, plan[l.name], config=C(residual=residual),
                               bn_scale=None if l.bn is None else bn_scale(l.bn)) for l in layers]
    finally:
        torch.set_num_threads(before)
    ptrs = set()
    for (layer, new, _), copy, ref in zip(results, kept, alone):
        assert torch.equal(new, copy), layer.name  # not overwritten by the second call
        assert torch.equal(new, ref), layer.name
        assert new.untyped_storage().data_ptr() not in ptrs, layer.name
        assert new.untyped_storage().data_ptr() != layer.conv.weight.untyped_storage().data_ptr()
        ptrs.add(new.untyped_storage().data_ptr())
    assert torch.count_nonzero(results[4][1]) == 0


# --- the config object ---------------------------------------------------------------------------
def test_config_defaults_validation_and_names():
    c = LRPETConfig()
    assert (c.effective_ratio, c.interval, c.ridge, c.energy_transfer, c.bn_rectification) == (0.5, 500, 1e-5, True, True)
    assert LRPETConfig(target_macs_cut=0.3).effective_ratio is None
    with pytest.raises(Exception):
        c.ridge = 1.0  # frozen
    with pytest.raises(TypeError, match="read-only"):
        LRPETConfig(overrides={"a*": 0.2}).overrides["b"] = 0.1
    assert hash(LRPETConfig(overrides={"a*": 0.2})) == hash(LRPETConfig(overrides={"a*": 0.2}))
    assert LRPETConfig(include=("backbone.res3.0.conv1", "backbone.*"), overrides={"x.y": 0.2}).explicit_names() == (
        "backbone.res3.0.conv1", "x.y")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['ratoi'\]"):
        LRPETConfig.from_kwargs({"ratoi": 0.5})
    with pytest.raises(ValueError, match=r"^cfg\.LRPET\.RIDGE \(lambda\) must be a finite number >= 0, got -1"):
        LRPETConfig.from_kwargs({"ridge": -1}, display=lambda n: f"cfg.LRPET.{n.upper()}")
    with pytest.raises(ValueError, match=r"^LRPETHook: interval must be an integer >= 1"):
        LRPETConfig.from_kwargs({"interval": 0}, who="LRPETHook")
    assert LRPETConfig(plan_input_size=64).plan_input_size == (64, 64)
    assert LRPETConfig.from_kwargs(c.to_dict()) == c  # plain data round trip


# --- the energy rank policy ----------------------------------------------------------------------
def _dropped(plan, spectra):
    total = 0.0
    for name, lp in plan.layers.items():
        sq = [v * v for v in spectra[name]]
        total += sum(sq[lp.rank:]) / sum(sq)
    return total


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_energy_policy_keeps_more_energy_for_the_same_cut(target):
    """Per-layer ranks from a Lagrangian allocation: the cut is reached, and the energy dropped (summed
    over layers, as fractions) is no more than the uniform ratio's for the same cut."""
    g = torch.Generator().manual_seed(0)
    spectra = {}
    for i, s in enumerate(SPECS):  # spectra decaying at different speeds per layer
        m = s.full_rank
        spectra[s.name] = (torch.exp(-torch.arange(m, dtype=torch.float64) / (m * (0.05 + 0.3 * i)))
                           * (1 + 0.01 * torch.rand(m, generator=g, dtype=torch.float64))).sort(descending=True)[0].tolist()
    uniform = build_rank_plan(SPECS, C(target_macs_cut=target))
    energy = build_rank_plan(SPECS, C(target_macs_cut=target, rank_policy="energy"), spectra=spectra)
    assert energy.reached_macs_cut >= target and energy.policy == "energy"
    assert len(set(lp.ratio for lp in energy.layers.values())) > 1  # really per layer
    if energy.reached_macs_cut <= uniform.reached_macs_cut:
        assert _dropped(energy, spectra) <= _dropped(uniform, spectra) + 1e-12
    with pytest.raises(ValueError, match="spectra"):
        build_rank_plan(SPECS, C(target_macs_cut=target, rank_policy="energy"))
    from lrpet_dense.core import RankPlan as RP
    assert RP.from_dict(energy.to_dict()).policy == "energy"


def test_package_exports_the_core_api():
    import lrpet_dense
    import lrpet_dense.core as core

    assert lrpet_dense.__all__ == core.__all__ and all(getattr(lrpet_dense, n) is getattr(core, n) for n in core.__all__)
