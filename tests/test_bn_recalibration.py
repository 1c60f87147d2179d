"""BN statistics recomputed after the final projection, and the rank warm-up schedule (core, torch only)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpet_dense.core import LRPETConfig, LRPETProjector
from lrpet_dense.core.bn import recalibrate_bn_, trainable_bn_layers
from lrpet_dense.core.projection import ConvBN
from lrpet_dense.core.rank import LayerPlan, RankPlan


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)).to(dtype)


def _batches(n=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 3, 9, 9, generator=g, dtype=dtype) * 2 + 0.5 for _ in range(n)]


def test_statistics_are_the_average_of_the_batch_statistics_with_weights_fixed():
    model = _model().eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    batches = _batches()
    out = recalibrate_bn_(model, batches, lambda m, x: m(x), num_batches=3)
    assert (out.num_layers, out.num_batches) == (2, 3)
    assert not model.training  # mode restored
    assert model[1].momentum == 0.1 and model[4].momentum == 0.1  # momentum restored
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    # Reference in float64: each BN's input per batch, in training mode (the first BN normalises with
    # batch statistics, which is what the second BN's input is in a training-mode forward).
    ref = _model().train()
    means = {1: [], 4: []}
    varis = {1: [], 4: []}
    with torch.no_grad():
        for x in batches:
            h = ref[0](x)
            means[1].append(h.mean((0, 2, 3)))
            varis[1].append(h.var((0, 2, 3), unbiased=True))
            h = ref[3](ref[2](ref[1](h)))
            means[4].append(h.mean((0, 2, 3)))
            varis[4].append(h.var((0, 2, 3), unbiased=True))
    for i in (1, 4):
        torch.testing.assert_close(model[i].running_mean, torch.stack(means[i]).mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model[i].running_var, torch.stack(varis[i]).mean(0), rtol=1e-12, atol=1e-12)


def test_a_failing_forward_changes_no_statistic():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def forward(m, x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("bad batch")
        m(x)

    with pytest.raises(RuntimeError, match="bad batch"):
        recalibrate_bn_(model, _batches(), forward, num_batches=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[1].momentum == 0.1


def test_non_finite_statistics_are_refused_and_nothing_changes():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [torch.full((2, 3, 9, 9), float("inf"), dtype=torch.float64)]
    with pytest.raises(FloatingPointError, match="non-finite"):
        recalibrate_bn_(model, bad, lambda m, x: m(x), num_batches=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_eval_mode_bn_and_unreached_bn_keep_their_statistics():
    class NormEval(nn.Module):  # like mmseg's ResNet(norm_eval=True): train() keeps the BN in eval mode
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head_bn = nn.Conv2d(3, 4, 1).double(), nn.BatchNorm2d(4).double(), nn.BatchNorm2d(4).double()

        def train(self, mode=True):
            super().train(mode)
            self.bn.eval()
            return self

        def forward(self, x):  # head_bn is never reached
            return self.bn(self.conv(x))

    model = NormEval()
    with torch.no_grad():
        model.head_bn.running_mean.fill_(3.0)
    assert [n for n, _ in trainable_bn_layers(model)] == ["head_bn"]
    bn_before = model.bn.running_mean.clone()
    out = recalibrate_bn_(model, _batches(), lambda m, x: m(x), num_batches=2)
    assert out.num_layers == 0  # the only trainable BN was not reached
    assert torch.equal(model.bn.running_mean, bn_before)
    assert torch.equal(model.head_bn.running_mean, torch.full((4,), 3.0, dtype=torch.float64))


def test_fewer_batches_than_asked_are_used_and_none_is_an_error():
    model = _model()
    assert recalibrate_bn_(model, _batches(2), lambda m, x: m(x), num_batches=5).num_batches == 2
    with pytest.raises(ValueError, match="ran out before the first"):
        recalibrate_bn_(model, [], lambda m, x: m(x), num_batches=5)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_batches"):
            recalibrate_bn_(model, _batches(), lambda m, x: m(x), num_batches=bad)


def test_no_batch_is_drawn_beyond_the_last():
    drawn = []

    def gen():
        for x in _batches(5):
            drawn.append(1)
            yield x

    recalibrate_bn_(_model(), gen(), lambda m, x: m(x), num_batches=2)
    assert len(drawn) == 2


def test_projector_recalibration_follows_on_error():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(m, x):
        raise RuntimeError("loader died")

    from lrpet_dense.core import ProjectionError

    with pytest.raises(ProjectionError, match="precise_bn_iters=0"):
        LRPETProjector(LRPETConfig(precise_bn_iters=2)).recalibrate_bn_(model, _batches(), boom, 10)
    assert LRPETProjector(LRPETConfig(precise_bn_iters=2, on_error="skip")).recalibrate_bn_(model, _batches(), boom, 10) is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert LRPETProjector(LRPETConfig(precise_bn_iters=0)).recalibrate_bn_(model, _batches(), boom, 10) is None
    out = LRPETProjector(LRPETConfig(precise_bn_iters=2)).recalibrate_bn_(model, _batches(), lambda m, x: m(x), 10)
    assert (out.num_layers, out.num_batches) == (2, 2)


@pytest.mark.parametrize("field", ["rank_warmup", "precise_bn_iters"])
@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_schedule_options_are_checked(field, bad):
    with pytest.raises(ValueError, match=field):
        LRPETConfig(**{field: bad})


def _plan():
    # full ranks 16 (16x8x3x3 -> min(16, 72)) and 8 (8x32x1x1), planned 4 and 2
    return RankPlan({"a": LayerPlan("a", (16, 8, 3, 3), 4, 0.75), "b": LayerPlan("b", (8, 32, 1, 1), 2, 0.75)}, 0.75)


def test_rank_warmup_shrinks_ranks_linearly_and_the_final_projection_uses_the_plan():
    plan = _plan()
    proj = LRPETProjector(LRPETConfig(rank_warmup=100))
    assert proj.ranks_at(plan, 0) == {}  # everything still at full rank: nothing to project
    assert proj.ranks_at(plan, 25) == {"a": 4 + int(12 * 0.75), "b": 2 + int(6 * 0.75)}
    assert proj.ranks_at(plan, 50) == {"a": 10, "b": 5}
    assert proj.ranks_at(plan, 99) == {"a": 4, "b": 2}
    assert proj.ranks_at(plan, 100) is plan and proj.ranks_at(plan, 300) is plan
    assert proj.ranks_at(plan, 10, final=True) is plan
    assert LRPETProjector(LRPETConfig()).ranks_at(plan, 1) is plan


def test_projection_during_rank_warmup_reaches_the_intermediate_rank():
    torch.manual_seed(0)
    convs = {"a": nn.Conv2d(8, 16, 3), "b": nn.Conv2d(32, 8, 1)}
    layers = [ConvBN(n, c, None) for n, c in convs.items()]
    proj = LRPETProjector(LRPETConfig(rank_warmup=100, bn_rectification=False))
    summary = proj.project_(layers, _plan(), 50)
    assert {s.name: s.rank for s in summary.stats} == {"a": 10, "b": 5}
    def rank(conv):  # float32 weights: what the projection dropped is at round-off level, far below 1e-4
        s = torch.linalg.svdvals(conv.weight.detach().double().reshape(conv.weight.shape[0], -1))
        return int((s > 1e-4 * s[0]).sum())

    assert (rank(convs["a"]), rank(convs["b"])) == (10, 5)
    early = proj.project_(layers, _plan(), 0)  # both layers still at full rank: a no-op with neutral scalars
    assert early.stats == [] and early.scalars("")["energy_kept_mean"] == 1.0
    proj.project_(layers, _plan(), 60, final=True)
    assert (rank(convs["a"]), rank(convs["b"])) == (4, 2)


def test_plain_session_recomputes_bn_statistics_after_the_final_projection():
    """``prepare(..., train_data=(batches, forward))``: after the last step's projection the BN statistics are
    recomputed from ``precise_bn_iters`` batches (counters reset); without ``train_data`` they are left as trained."""
    import lrpet_dense as lrpet

    def run(train_data):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                              nn.BatchNorm2d(16))
        session = lrpet.prepare(model, torch.randn(1, 3, 12, 12), LRPETConfig(ratio=0.5, interval=2, precise_bn_iters=3),
                                total_steps=4, train_data=train_data)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for x in _batches(4, torch.float32):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            session.step()
        return model

    model = run((_batches(5, torch.float32), lambda m, x: m(x)))
    assert [int(m.num_batches_tracked) for m in model if isinstance(m, nn.BatchNorm2d)] == [3, 3]
    model = run(None)
    assert [int(m.num_batches_tracked) for m in model if isinstance(m, nn.BatchNorm2d)] == [4, 4]
