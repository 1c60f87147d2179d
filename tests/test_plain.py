"""LRPET on any ``nn.Module`` in a plain PyTorch loop (``lrpet_dense.core.plain``), torch only.

torchvision ResNet-18 / ResNet-50 train a few steps with projections, are factorised, saved, loaded
into a fresh model, and compute what the projected dense model computes, in float64; the pairing
from the recorded forward, its errors, and the session's schedule and resume.
"""
from __future__ import annotations

import copy
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lrpet_dense as lrpet
from lrpet_dense.core import LRPETConfig, LRPETSession, compare_outputs
from lrpet_dense.core.verify import float64_copy, rank_excess

REPO = Path(__file__).resolve().parents[1]
torchvision = pytest.importorskip("torchvision")


def _bn_for(conv_name: str) -> str:
    """torchvision ResNet's naming: conv1 -> bn1, layerX.Y.convN -> bnN, downsample.0 -> downsample.1."""
    if conv_name.endswith("downsample.0"):
        return conv_name[:-1] + "1"
    head, _, tail = conv_name.rpartition(".")
    return (head + "." if head else "") + "bn" + tail[len("conv"):]


def test_resnet_pairing_from_the_forward():
    model = torchvision.models.resnet50(num_classes=4)
    pairing = lrpet.pair_convs(model, torch.randn(1, 3, 32, 32))
    names = {id(m): n for n, m in model.named_modules()}
    assert len(pairing.layers) == 53 and not pairing.notes and not pairing.unpaired
    for name, conv, bn in pairing.layers:
        assert names[id(bn)] == _bn_for(name), name


class _Twice(nn.Module):
    """conv0's output goes into two BatchNorms."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn_a, self.bn_b = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv0(x)
        return self.bn_a(y) + self.bn_b(y)


class _SharedNorm(nn.Module):
    """One BatchNorm after two convs."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b, self.bn = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))


class _Mixed(nn.Module):
    """conv -> in-place ReLU -> BN (not right after the conv), a GroupNorm, and a conv never called."""

    def __init__(self):
        super().__init__()
        self.c1, self.act, self.bn1 = nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(8)
        self.c2, self.gn = nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8)
        self.unused = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.gn(self.c2(self.bn1(self.act(self.c1(x)))))


@pytest.mark.parametrize("model, match", [
    (_Twice(), r"cannot pair conv 'conv0' with one norm: its output goes straight into \['bn_a', 'bn_b'\]"),
    (_SharedNorm(), r"cannot pair conv 'conv_a': its norm 'bn' also follows \['conv_b'\]"),
])
def test_ambiguous_pairing_is_an_error_naming_the_layer(model, match):
    with pytest.raises(ValueError, match=match):
        lrpet.pair_convs(model, torch.randn(1, 3, 8, 8))


def test_unpaired_convs_are_logged_not_guessed():
    pairing = lrpet.pair_convs(_Mixed(), torch.randn(1, 3, 8, 8))
    assert pairing.names == ["c1", "c2"] and pairing.unpaired == ["c1", "c2"]
    assert any("c2: norm GroupNorm is not a BatchNorm" in n for n in pairing.notes)
    assert any("not called by the example forward" in n and "unused" in n for n in pairing.notes)


def test_selection_by_patterns_and_filter_fn():
    model = torchvision.models.resnet18(num_classes=4)
    x = torch.randn(1, 3, 32, 32)
    pairing = lrpet.pair_convs(model, x, LRPETConfig(include=("layer3.*", "layer4.*"), exclude=("*downsample*",)),
                               filter_fn=lambda conv, name: conv.kernel_size == (3, 3))
    assert pairing.names and all(n.startswith(("layer3.", "layer4.")) and "downsample" not in n
                                 for n in pairing.names)
    with pytest.raises(ValueError, match="include pattern 'layer9.*' matches no candidate"):
        lrpet.pair_convs(model, x, LRPETConfig(include=("layer9.*",)))


def _train(model, session, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    projected = []
    for step in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(4, (4,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if session.step() is not None:
            projected.append(session.steps_done)
    return projected


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_torchvision_resnet_trains_factorises_and_matches_in_float64(arch, tmp_path):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=4)
    example = torch.randn(2, 3, 32, 32)
    session = lrpet.prepare(model, example, LRPETConfig(target_macs_cut=0.4, interval=2), total_steps=3)
    assert session.plan.reached_macs_cut >= 0.4
    assert _train(model, session, 3) == [2, 3]  # every 2 steps and after the last
    assert not rank_excess(model, session.plan)  # every planned conv is of its rank
    model.eval()
    dense = copy.deepcopy(model)
    names = lrpet.compress_model_(model, session.plan, example)
    assert names and len(names) == sum(lp.factorize for lp in session.plan.layers.values())
    lrpet.save_compressed(model, str(tmp_path / "c.pth"))
    fresh = getattr(torchvision.models, arch)(num_classes=4)
    ckpt = lrpet.load_compressed_(fresh, str(tmp_path / "c.pth"))
    assert lrpet.plan_from_checkpoint(ckpt).ranks == session.plan.ranks
    assert sum(isinstance(m, lrpet.FactorizedConv2d) for m in fresh.modules()) == len(names)
    x = torch.randn(3, 3, 40, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():  # the tolerance of every output check (lrpet_dense.core.verify)
        compare_outputs(float64_copy(dense)(x), float64_copy(fresh)(x), rtol=1e-4)


def test_compress_refuses_weights_that_are_not_low_rank():
    model = torchvision.models.resnet18(num_classes=4).eval()
    example = torch.randn(1, 3, 32, 32)
    session = lrpet.prepare(model, example, LRPETConfig(ratio=0.5))
    with pytest.raises(ValueError, match=r"not of their planned rank.*project=True"):
        lrpet.compress_model_(model, session.plan, example)
    assert not any(isinstance(m, lrpet.FactorizedConv2d) for m in model.modules())
    lrpet.compress_model_(model, session.plan, example, project=True)  # one-shot truncation first
    assert any(isinstance(m, lrpet.FactorizedConv2d) for m in model.modules())


def test_load_compressed_refuses_a_dense_file_and_another_model(tmp_path):
    model = torchvision.models.resnet18(num_classes=4).eval()
    example = torch.randn(1, 3, 32, 32)
    torch.save({"model": model.state_dict()}, tmp_path / "dense.pth")
    with pytest.raises(ValueError, match="not a compressed LRPET checkpoint"):
        lrpet.load_compressed_(torchvision.models.resnet18(num_classes=4), str(tmp_path / "dense.pth"))
    session = lrpet.prepare(model, example, LRPETConfig(ratio=0.5))
    lrpet.compress_model_(model, session.plan, example, project=True)
    lrpet.save_compressed(model, str(tmp_path / "c.pth"))
    with pytest.raises(ValueError, match="does not match"):
        lrpet.load_compressed_(torchvision.models.resnet18(num_classes=7), str(tmp_path / "c.pth"))


def test_session_refuses_a_factorised_model_and_resumes_its_schedule(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    example = torch.randn(1, 3, 32, 32)
    config = LRPETConfig(ratio=0.5, interval=2)
    session = lrpet.prepare(model, example, config)
    assert _train(model, session, 3) == [2]
    torch.save({"lrpet": session.state_dict()}, tmp_path / "ckpt.pth")
    # resumed: the counters and step come back; the next projection is at step 4; finish() projects at 5
    resumed = lrpet.prepare(model, example, config.replace(ratio=0.3))  # other options: the saved plan wins
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True)["lrpet"])
    assert resumed.plan.ranks == session.plan.ranks and resumed.steps_done == 3
    assert _train(model, resumed, 2, seed=1) == [4]
    assert resumed.finish() is not None and resumed.projector.last_iter == 5 and resumed.finish() is None
    changed = torchvision.models.resnet18(num_classes=4)
    changed.layer1[0].conv1 = nn.Conv2d(64, 64, 1, bias=False)  # the saved plan's layer has another shape here
    other = lrpet.prepare(changed, example, config)
    with pytest.raises(ValueError, match="the checkpoint's LRPET plan does not fit this model"):
        other.load_state_dict(session.state_dict())
    model.eval()
    lrpet.compress_model_(model, resumed.plan, example)
    with pytest.raises(ValueError, match="LRPET training needs a dense model, but the model is factorised"):
        lrpet.prepare(model, example, config)


def test_final_steps_run_once_after_the_final_projection():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16))
    session = lrpet.prepare(model, torch.randn(1, 3, 8, 8), LRPETConfig(ratio=0.5, interval=10), total_steps=3)
    seen = []
    session.final_steps.append(lambda s: seen.append((s.steps_done, s.projector.last_iter)))
    assert [session.step() is not None for _ in range(3)] == [False, False, True]
    session.finish()
    assert seen == [(3, 3)]


def test_session_checks_its_plan():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3))
    example = torch.randn(1, 3, 8, 8)
    pairing = lrpet.pair_convs(model, example)
    plan = lrpet.build_plan(model, pairing.layers, LRPETConfig(ratio=0.5), example)
    with pytest.raises(ValueError, match=r"names 1 layer\(s\) that are not selected"):
        LRPETSession(model, pairing.layers[:1], plan, LRPETConfig())
    with pytest.raises(ValueError, match="plans on the example input"):
        lrpet.build_plan(model, pairing.layers, LRPETConfig(ratio=0.5, plan_input_size=(16, 16)), example)


def _doc_snippet() -> str:
    text = (REPO / "docs" / "pytorch.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/pytorch.md has no python block"
    return blocks[0]


@pytest.mark.slow
def test_the_documented_loop_runs(tmp_path, monkeypatch):
    """``docs/pytorch.md``'s loop, as written (ResNet-50; it writes resnet50_lrpet.pth in the cwd)."""
    monkeypatch.chdir(tmp_path)
    code = _doc_snippet()
    assert len(code.strip().splitlines()) <= 35
    scope: dict = {}
    exec(compile(code, "docs/pytorch.md", "exec"), scope)
    assert (tmp_path / "resnet50_lrpet.pth").exists()
    assert scope["session"].projector.num_projections == 2 and scope["session"].projector.last_iter == 4
    assert sum(isinstance(m, lrpet.FactorizedConv2d) for m in scope["deployed"].modules()) > 0
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        compare_outputs(float64_copy(scope["model"])(x), float64_copy(scope["deployed"])(x))


@pytest.mark.slow
def test_example_script(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["resnet50_plain.py", "--steps", "3", "--interval", "2", "--size", "32",
                                      "--batch", "4", "--out", str(tmp_path)])
    result = runpy.run_path(str(REPO / "examples" / "resnet50_plain.py"), run_name="example")["main"]()
    assert result["reloaded_same"] and result["factorized"] and result["plan"].reached_macs_cut >= 0.5


@pytest.mark.slow
def test_plain_export_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3),
                          nn.BatchNorm2d(32))
    example = torch.randn(1, 3, 16, 16)
    session = lrpet.prepare(model, example, LRPETConfig(ratio=0.6))
    model.eval()
    lrpet.compress_model_(model, session.plan, example, project=True)
    lrpet.to_inference_(model, example)
    out = lrpet.export_onnx(model, str(tmp_path / "m.onnx"), example)
    # the second conv's rank 12 is padded to 16 in the file (the first one's padded pair would cost more)
    assert (tmp_path / "m.onnx").exists() and out["outputs"] == 1 and out["aligned"] == ["3"]


def test_count_complexity_counts_the_factorised_model_with_torchs_counter():
    model = torchvision.models.resnet18(num_classes=4).eval()
    example = torch.randn(1, 3, 32, 32)
    before = lrpet.core.plain.count_complexity(model, example)["model"]
    session = lrpet.prepare(model, example, LRPETConfig(target_macs_cut=0.5))
    lrpet.compress_model_(model, session.plan, example, project=True)
    after = lrpet.core.plain.count_complexity(model, example)["model"]
    convs = before["macs"] - after["macs"]  # only conv MACs change: the plan's cut of them, to the MAC
    assert convs == session.plan.macs_before - session.plan.macs_after > 0
    assert after["params"] < before["params"]
