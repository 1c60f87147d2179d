"""Model surgery and compressed loading in the core: every reference replaced or a loud error, atomic
undo, the plan carried with the weights into any model type, and outputs checked in float64."""
import collections
import functools

import pytest
import torch
from torch import nn

from lrpet_dense.core import (FactorizedConv2d, LayerSpec, LRPETConfig, OutputMismatchError, build_rank_plan,
                              compare_outputs, enable_compressed_loading_, factorize_, lrpet_project)
from lrpet_dense.core import factorize as factorize_module
from lrpet_dense.core.factorize import compressed_state_dict, model_plan
from lrpet_dense.core.verify import float64_copy, rank_excess

pytestmark = pytest.mark.timeout(120)

Pair = collections.namedtuple("Pair", "first second")


class _FPNLike(nn.Module):
    """Registered convs that forward() reaches through plain containers, as detectron2's FPN does."""

    def __init__(self):
        super().__init__()
        self.lateral2 = nn.Conv2d(8, 16, 1)
        self.lateral3 = nn.Conv2d(8, 16, 1)
        self.output = nn.Conv2d(16, 16, 3, padding=1)
        self.laterals = [self.lateral3, self.lateral2]  # plain list, reversed order
        self.pair = Pair(self.output, [self.lateral2])  # namedtuple holding a list
        self.by_level = {"p2": self.output, "nested": {"deep": (self.lateral3,)}}
        self.__dict__["hidden"] = self.output  # a plain attribute that bypasses registration

    def forward(self, x):
        y = sum(conv(x) for conv in self.laterals)
        y = y + self.pair.second[0](x) + self.by_level["nested"]["deep"][0](x)
        return self.hidden(self.by_level["p2"](self.pair.first(y)))


def _low_rank_(module, ranks):
    with torch.no_grad():
        for name, k in ranks.items():
            conv = module.get_submodule(name)
            conv.weight.copy_(lrpet_project(conv.weight, k))


def test_every_reference_is_replaced():
    torch.manual_seed(0)
    net = _FPNLike().double().eval()
    ranks = {"lateral2": 3, "lateral3": 3, "output": 4}
    _low_rank_(net, ranks)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    ref = net(x)
    old = {n: net.get_submodule(n) for n in ranks}
    assert sorted(factorize_(net, ranks)) == sorted(ranks)
    new = {n: net.get_submodule(n) for n in ranks}
    assert all(isinstance(m, FactorizedConv2d) for m in new.values())
    assert net.laterals == [new["lateral3"], new["lateral2"]]
    assert isinstance(net.pair, Pair) and net.pair.first is new["output"] and net.pair.second[0] is new["lateral2"]
    assert net.by_level["p2"] is new["output"] and net.by_level["nested"]["deep"][0] is new["lateral3"]
    assert net.__dict__["hidden"] is new["output"]
    torch.testing.assert_close(net(x), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="'output' was replaced by its factorised form"):
        old["output"](torch.randn(1, 16, 3, 3, dtype=torch.float64))  # a stale reference fails, not computes


class _Closure(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.call = functools.partial(self.conv)  # a reference the surgery cannot see

    def forward(self, x):
        return self.call(x)


def test_unreachable_reference_is_a_loud_error():
    net = _Closure()
    _low_rank_(net, {"conv": 2})
    factorize_(net, {"conv": 2})
    with pytest.raises(RuntimeError, match="still calls the original module"):
        net(torch.randn(1, 4, 3, 3))


def test_surgery_is_undone_when_a_swap_fails(monkeypatch):
    net = _FPNLike()
    ranks = {"lateral2": 3, "lateral3": 3, "output": 4}
    _low_rank_(net, ranks)
    before = {n: net.get_submodule(n) for n in ranks}
    laterals, pair, hidden = list(net.laterals), net.pair, net.__dict__["hidden"]
    real = factorize_module.replace_everywhere
    calls = []

    def flaky(root, old, new, undo):
        calls.append(old)
        count = real(root, old, new, undo)
        if len(calls) == 2:
            raise RuntimeError("injected failure after a partial swap")
        return count

    monkeypatch.setattr(factorize_module, "replace_everywhere", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        factorize_(net, ranks)
    assert {n: net.get_submodule(n) for n in ranks} == before
    assert net.laterals == laterals and net.pair is pair and net.__dict__["hidden"] is hidden
    assert model_plan(net) is None and not any(isinstance(m, FactorizedConv2d) for m in net.modules())


def test_plan_leaves_dense_the_layers_that_would_not_save():
    specs = [LayerSpec("square1x1", (64, 64, 1, 1), (8, 8)), LayerSpec("wide3x3", (64, 64, 3, 3), (8, 8))]
    plan = build_rank_plan(specs, LRPETConfig(ratio=0.5))  # rank 32 of a 64x64 1x1 conv: 32 x 128 = 64 x 64 MACs
    assert list(plan.layers) == ["wide3x3"] and plan.left_dense == ["square1x1"]
    assert "left dense and not projected" in plan.format_table()
    named = build_rank_plan(specs, LRPETConfig(ratio=0.5, include=("square1x1", "wide*")))  # asked for by name
    assert list(named.layers) == ["square1x1", "wide3x3"] and not named.left_dense
    # the MAC cut is measured against every selected layer, the one left dense included
    assert plan.reference_macs == sum(64 * 64 * k * 64 for k in (1, 9))
    assert plan.reached_macs_cut == pytest.approx(named.reached_macs_cut)
    from lrpet_dense.core import RankPlan
    assert RankPlan.from_dict(plan.to_dict()).left_dense == ["square1x1"]


def _net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3))


@pytest.mark.parametrize("carrier", ["both", "tensor", "metadata"])
def test_compressed_state_dict_loads_into_any_module(carrier):
    torch.manual_seed(1)
    net = _net().eval()
    _low_rank_(net, {"0": 2, "3": 4})
    factorize_(net, {"0": 2, "3": 4})
    sd = compressed_state_dict(net)
    if carrier == "tensor":
        meta = sd._metadata
        sd._metadata = collections.OrderedDict((k, {kk: vv for kk, vv in v.items() if kk != "lrpet_plan"})
                                               for k, v in meta.items())
    elif carrier == "metadata":
        del sd["_lrpet_plan"]
    fresh = _net().eval()
    with pytest.raises(RuntimeError, match="Unexpected key"):  # a stock module cannot know the plan
        fresh.load_state_dict(sd, strict=True)
    fresh = enable_compressed_loading_(_net().eval())
    fresh.load_state_dict(sd, strict=True)
    assert isinstance(fresh[3], FactorizedConv2d) and model_plan(fresh).ranks == {"0": 2, "3": 4}
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    # a checkpoint saved from the factorised model carries its plan too (metadata of its state dict)
    again = enable_compressed_loading_(_net().eval())
    again.load_state_dict(fresh.state_dict(), strict=True)
    assert isinstance(again[0], FactorizedConv2d)
    with pytest.raises(ValueError, match="checkpoint is dense"):
        again.load_state_dict(_net().state_dict())
    stripped = {k: v for k, v in sd.items() if k != "_lrpet_plan"}  # plain dict: no metadata, no key
    with pytest.raises(ValueError, match="no LRPET plan"):
        enable_compressed_loading_(_net()).load_state_dict(stripped)


def test_rank_excess_and_output_check():
    torch.manual_seed(2)
    net = _net().double().eval()  # projected in float64: exactly rank 4, so factorising is exact
    assert rank_excess(net, {"3": 4}) == {"3": (32, 4)}
    _low_rank_(net, {"3": 4})
    assert rank_excess(net, {"3": 4}) == {}
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        ref = float64_copy(net)(x)
        fact = float64_copy(net)
        factorize_(fact, {"3": 4})
        errors = compare_outputs({"out": ref}, {"out": fact(x)})
        assert errors["out"] < 1e-10
        with torch.no_grad():
            fact[3].conv_b.weight.mul_(1.01)
        with pytest.raises(OutputMismatchError, match="differs by 1.*e-02 of its scale"):
            compare_outputs({"out": ref}, {"out": fact(x)})
    with pytest.raises(OutputMismatchError, match="other outputs"):
        compare_outputs({"a": ref}, {"b": ref})
