"""No silent wrong results: each path that used to give one now gives the right result or a clear error.

- detectron2's R50-FPN, whose FPN keeps its convs in plain lists too: selection, pairing, training,
  compression (with the FLOP count), reload with detectron2's stock ``GeneralizedRCNN``, evaluation,
  report; the factorised model's pre-NMS tensors equal the dense model's in float64.
- A compressed checkpoint under the framework's stock model type (mmseg ``EncoderDecoder`` with the
  hook in the config; detectron2 ``GeneralizedRCNN``) evaluates exactly as under the LRPET type.
- Training with the hook from a compressed checkpoint is refused in both frameworks.
- Both compression tools refuse weights that are not low-rank unless ``--project`` is given.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import D2_TINY, D2_TOY_CFG, REPO, SEG_TOY_CFG, macs_cut, mmseg_tools, module_temp, run_tool, seg_env
from lrpet_dense.configs import config_path  # noqa: E402

pytestmark = pytest.mark.timeout(900)

FPN_TOY_CFG = Path(config_path("toy/faster_rcnn_fpn_lrpet_toy.yaml"))


def run_failing(args, env_extra=None, cwd=REPO, timeout=420):
    """Run a Python tool that must fail; return its exit status and stdout + stderr."""
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode != 0, f"{args[0]} succeeded but should have failed:\n{proc.stdout[-2000:]}"
    return proc.returncode, proc.stdout + proc.stderr


def _d2_cfg(config, *opts):
    from detectron2.config import get_cfg

    from lrpet_dense.detectron2 import add_lrpet_config

    cfg = get_cfg()
    add_lrpet_config(cfg)
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(list(D2_TINY) + list(opts))
    return cfg


# =============================================================================== detectron2 R50-FPN
@pytest.fixture(scope="module")
def fpn_run(d2_toy_voc, request):
    """LRPET training of the toy R50-FPN (5 steps, projections at 2, 4, 5), then tools/compress_det.py."""
    pytest.importorskip("detectron2")
    out = module_temp(request, "fpn_run")
    d2_train_fpn = ["tools/train_det.py", "--config", FPN_TOY_CFG, *D2_TINY, "OUTPUT_DIR", out]
    log = run_tool(d2_train_fpn, {"LRPET_TOY_VOC": d2_toy_voc})
    compressed = out / "model_compressed.pth"
    text = run_tool(["tools/compress_det.py", "--config", FPN_TOY_CFG, "--checkpoint", out / "model_final.pth",
                     "--output", compressed, *D2_TINY], {"LRPET_TOY_VOC": d2_toy_voc})
    return out, compressed, log, text


@pytest.mark.slow
def test_fpn_selection_projects_resnet_and_fpn_convs(fpn_run):
    from lrpet_dense.detectron2 import plan_from_checkpoint

    out, _, log, _ = fpn_run
    assert re.findall(r"LRPET projection at step (\d+)", log) == ["2", "4", "5"]
    plan = plan_from_checkpoint(torch.load(out / "model_final.pth", map_location="cpu", weights_only=True))
    fpn = [n for n in plan.layers if n.startswith("backbone.fpn_")]
    assert {n.rsplit("_", 1)[1][:-1] for n in fpn} == {"lateral", "output"}
    assert all(n.startswith(("backbone.bottom_up.res3", "backbone.bottom_up.res4", "backbone.bottom_up.res5",
                             "backbone.fpn_")) for n in plan.layers)  # stem and res2 are frozen
    assert 0.5 <= plan.reached_macs_cut < 0.52


@pytest.mark.slow
def test_fpn_compress_counts_and_replaces_the_fpn_lists(fpn_run):
    from lrpet_dense.core import FactorizedConv2d
    from lrpet_dense.detectron2.deploy import load_model

    out, compressed, _, text = fpn_run
    cut = macs_cut(text)
    assert 49.0 <= cut <= 52.0  # FlopCountAnalysis ran (it failed on the bypassed convs before)
    model, _ = load_model(_d2_cfg(FPN_TOY_CFG), str(compressed))
    fpn = model.backbone
    assert all(isinstance(m, FactorizedConv2d) for m in fpn.lateral_convs + fpn.output_convs)
    assert fpn.lateral_convs[-1] is fpn.fpn_lateral2 and fpn.output_convs[0] is fpn.fpn_output5


@pytest.mark.slow
def test_fpn_factorised_equals_dense_in_float64(fpn_run, d2_toy_voc):
    from detectron2.data.detection_utils import read_image

    from lrpet_dense.core import compare_outputs
    from lrpet_dense.core.verify import float64_copy
    from lrpet_dense.detectron2 import load_model, output_tensors

    out, compressed, _, _ = fpn_run
    cfg = _d2_cfg(FPN_TOY_CFG)
    dense, _ = load_model(cfg, str(out / "model_final.pth"))
    fact, _ = load_model(cfg, str(compressed))
    img = sorted((Path(d2_toy_voc) / "VOC2007" / "JPEGImages").glob("*.jpg"))[0]
    image = torch.as_tensor(read_image(str(img), format="BGR").copy()).permute(2, 0, 1).double()
    errors = compare_outputs(output_tensors(float64_copy(dense), image),
                             output_tensors(float64_copy(fact), image), rtol=1e-4)
    assert {k for k in errors if k.startswith("backbone.")} == {f"backbone.p{i}" for i in range(2, 7)}


@pytest.mark.slow
def test_fpn_eval_only_with_stock_meta_architecture(fpn_run, d2_toy_voc, tmp_path):
    out, compressed, _, _ = fpn_run
    base = ["tools/train_det.py", "--config", FPN_TOY_CFG, "--eval-only", *D2_TINY, "MODEL.WEIGHTS", compressed]
    lrpet = run_tool(base + ["OUTPUT_DIR", tmp_path / "a"], {"LRPET_TOY_VOC": d2_toy_voc})
    stock = run_tool(base + ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "OUTPUT_DIR", tmp_path / "b"],
                     {"LRPET_TOY_VOC": d2_toy_voc})
    ap = [re.search(r"copypaste: ([\d.naN]+),([\d.naN]+),([\d.naN]+)\n", t).groups() for t in (lrpet, stock)]
    assert ap[0] == ap[1]  # the same factorised computation under either type


@pytest.mark.slow
def test_fpn_report(fpn_run, d2_toy_voc, tmp_path):
    out, compressed, _, _ = fpn_run
    run_tool(["tools/report.py", "det", "--config", FPN_TOY_CFG, "--checkpoint", out / "model_final.pth",
              "--compressed", compressed, "--out", tmp_path / "report", "--repeats", "1", "--warmup", "0",
              "--threads", "1", "--quiet", *D2_TINY], {"LRPET_TOY_VOC": d2_toy_voc})
    import json
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "FPN" in data["title"] and any(n.startswith("backbone.fpn_") for n in data["factorized_layers"])
    assert data["complexity"]["factorized"]["backbone"]["macs"] < data["complexity"]["dense"]["backbone"]["macs"]


# =============================================================================== training from compressed
@pytest.mark.slow
def test_d2_lrpet_training_from_compressed_is_refused(d2_small_ckpts, d2_toy_voc, tmp_path):
    compressed, _ = d2_small_ckpts
    code, text = run_failing(["tools/train_det.py", "--config", D2_TOY_CFG, *D2_TINY, "MODEL.WEIGHTS", compressed,
                              "OUTPUT_DIR", tmp_path], {"LRPET_TOY_VOC": d2_toy_voc})
    assert "LRPET training needs a dense model, but the model is factorised" in text and "LRPET.ENABLED False" in text
    assert not (tmp_path / "model_final.pth").exists()


@pytest.mark.slow
def test_seg_load_from_compressed_with_hook_is_refused(seg_small_ckpts, seg_toy_data, tmp_path):
    compressed, _ = seg_small_ckpts
    code, text = run_failing([mmseg_tools() / "train.py", SEG_TOY_CFG, "--work-dir", tmp_path, "--cfg-options",
                              f"load_from={compressed}"], {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)}, cwd=tmp_path)
    assert "LRPET training needs a dense model, but the model is factorised" in text
    assert not list(tmp_path.glob("iter_*.pth"))


def test_training_a_model_factorised_while_loading_is_an_error(d2_small_ckpts, seg_small_ckpts, seg_toy_data):
    """Trainers build the optimizer before loading weights: layers a compressed checkpoint installs while
    loading would not be trained. The LRPET model types refuse such training instead of doing nothing."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(_d2_cfg(D2_TOY_CFG))
    DetectionCheckpointer(model).load(str(d2_small_ckpts[0]))
    model.train()
    with pytest.raises(RuntimeError, match="factorised while a compressed checkpoint was loaded.*MODEL.WEIGHTS"):
        model([])

    from unittest import mock

    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from lrpet_dense.core import FactorizedConv2d
    from lrpet_dense.io import load_checkpoint_safe

    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)}):
        cfg = Config.fromfile(str(SEG_TOY_CFG))
    init_default_scope("mmseg")
    compressed = seg_small_ckpts[0]
    seg = MODELS.build(cfg.model)
    seg.load_state_dict(load_checkpoint_safe(str(compressed))["state_dict"])
    with pytest.raises(RuntimeError, match="factorized_from=CHECKPOINT"):
        seg.loss(torch.zeros(2, 3, 8, 8), [])
    # built factorised from the start: the optimizer (built next) holds the factorised layers
    cfg.model.factorized_from = str(compressed)
    prebuilt = MODELS.build(cfg.model)
    assert isinstance(prebuilt.backbone.layer1[1].conv1, FactorizedConv2d)
    prebuilt.load_state_dict(load_checkpoint_safe(str(compressed))["state_dict"], strict=True)
    cfg.model.factorized_from = str(seg_small_ckpts[1])  # a dense checkpoint: refused
    with pytest.raises(ValueError, match="is not a compressed checkpoint"):
        MODELS.build(cfg.model)


@pytest.mark.slow
def test_seg_fine_tune_compressed_model_with_mmseg_train_tool(seg_small_ckpts, seg_toy_data, tmp_path):
    """Decompose-then-fine-tune through mmseg's own tools/train.py: factorized_from + load_from, no hook."""
    import lrpet_dense.mmseg  # noqa: F401

    compressed = seg_small_ckpts[0]
    body = (f"custom_hooks = []\nmodel = dict(factorized_from={str(compressed)!r})\n"
            f"load_from = {str(compressed)!r}\n")
    cfg = _write_cfg(tmp_path / "ft.py", body)
    text = run_tool([mmseg_tools() / "train.py", cfg, "--work-dir", tmp_path], {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)})
    assert "unexpected key" not in text and "missing keys" not in text
    before = torch.load(compressed, map_location="cpu", weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "iter_3.pth", map_location="cpu", weights_only=True)["state_dict"]
    key = "backbone.layer1.1.conv1.conv_a.weight"
    assert key in after and not torch.equal(after[key], before[key])  # the factorised layer was trained
    assert "lrpet_plan" in after._metadata[""]  # the fine-tuned checkpoint still carries its plan


# =============================================================================== stock model types
def _write_cfg(path: Path, body: str) -> Path:
    path.write_text(f"_base_ = {str(SEG_TOY_CFG)!r}\n{body}")
    return path


def _miou(text: str) -> str:
    return re.findall(r"mIoU: ([\d.]+)", text)[-1]


@pytest.mark.slow
def test_seg_test_tool_stock_encoder_decoder_with_hook(seg_run, seg_toy_data, tmp_path):
    """mmseg's own tools/test.py, stock ``EncoderDecoder`` + the hook in the config: the compressed
    checkpoint is built factorised (no unexpected keys) and evaluates exactly as with LRPETEncoderDecoder."""
    compressed = tmp_path / "compressed.pth"
    env = {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)}
    run_tool(["tools/compress_seg.py", SEG_TOY_CFG, seg_run / "iter_3.pth", compressed], env)
    stock = _write_cfg(tmp_path / "stock.py", "model = dict(type='EncoderDecoder')\n")
    outs = []
    for cfg in (SEG_TOY_CFG, stock):
        proc = subprocess.run([sys.executable, str(mmseg_tools() / "test.py"), str(cfg), str(compressed),
                               "--work-dir", str(tmp_path / cfg.stem)], env=seg_env(seg_toy_data), cwd=tmp_path,
                              capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = proc.stdout + proc.stderr
        assert "unexpected key" not in text and "missing keys" not in text
        outs.append(text)
    assert _miou(outs[0]) == _miou(outs[1])


# =============================================================================== not low-rank: refuse or --project
@pytest.mark.slow
def test_compress_tools_refuse_weights_that_are_not_low_rank(d2_toy_voc, seg_toy_data, tmp_path):
    """A dense checkpoint with no LRPET plan: both tools name the missing plan, then the missing --project,
    and with both they project, factorise and check."""
    import lrpet_dense.mmseg  # noqa: F401  (allow-lists mmengine checkpoints)
    from detectron2.modeling import build_model

    cfg = _d2_cfg(D2_TOY_CFG)
    dense = tmp_path / "d2_dense.pth"
    torch.save({"model": build_model(cfg).state_dict()}, dense)
    base = ["tools/compress_det.py", "--config", D2_TOY_CFG, "--checkpoint", dense, "--no-flops",
            "--output", tmp_path / "d2_out.pth"]
    env = {"LRPET_TOY_VOC": d2_toy_voc}
    for extra, message in (([], "carries no LRPET plan"), (["--ratio", "0.5"], "not of their planned rank.*--project")):
        code, text = run_failing(base + extra + D2_TINY, env)
        assert code == 2 and re.search("error: .*" + message, text)
    assert not (tmp_path / "d2_out.pth").exists()
    text = run_tool(base + ["--ratio", "0.5", "--project"] + D2_TINY, env)
    assert "outputs checked against the dense model in float64" in text

    from unittest import mock

    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)}):
        scfg = Config.fromfile(str(SEG_TOY_CFG))
    init_default_scope("mmseg")
    seg_dense = tmp_path / "seg_dense.pth"
    torch.save({"meta": {}, "state_dict": MODELS.build(scfg.model).state_dict()}, seg_dense)
    env = {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)}
    base = ["tools/compress_seg.py", SEG_TOY_CFG, seg_dense, tmp_path / "seg_out.pth"]
    for extra, message in (([], "carries no LRPET plan"), (["--ratio", "0.5"], "not of their planned rank.*--project")):
        code, text = run_failing(base + extra, env)
        assert code == 2 and re.search("error: .*" + message, text)
    assert not (tmp_path / "seg_out.pth").exists()
    text = run_tool(base + ["--plan-from-config", "--project"], env)
    assert "logits checked against the dense model in float64" in text and (tmp_path / "seg_out.pth").exists()
