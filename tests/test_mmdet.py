"""The mmdet adapter in mmdet's own runner and tools, on a tiny generated VOC2007 set (CPU).

One real training run of each toy config (Faster R-CNN and RetinaNet R50-FPN) by mmdet's own
``tools/train.py`` (module-scoped) feeds the projection, resume, compression and evaluation checks;
evaluation is mmdet's own ``tools/test.py`` with the LRPET model type, the stock type, and the stock
type in a process that never imported lrpet_dense (what a user sees then).
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mmdet")

import mmdet  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import lrpet_dense.mmdet as ld  # noqa: E402
from lrpet_dense.configs import config_path  # noqa: E402
from lrpet_dense.core import FactorizedConv2d, LRPETConfig, RankPlan, compare_outputs  # noqa: E402
from lrpet_dense.core.verify import float64_copy  # noqa: E402
from conftest import module_temp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FRCNN_TOY = Path(config_path("toy/faster-rcnn_r50_fpn_lrpet_toy.py"))
RETINA_TOY = Path(config_path("toy/retinanet_r50_fpn_lrpet_toy.py"))
FRCNN_FULL = Path(config_path("faster-rcnn_r50_fpn_lrpet_voc0712.py"))
RETINA_FULL = Path(config_path("retinanet_r50_fpn_lrpet_voc0712.py"))
MMDET_TOOLS = Path(mmdet.__file__).parent / ".mim" / "tools"

pytestmark = pytest.mark.timeout(900)


def _env(data_root: Path) -> dict:
    env = dict(os.environ, LRPET_TOY_VOC_ROOT=str(data_root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(cmd, data_root, cwd, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable] + [str(c) for c in cmd], env=_env(data_root), cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _cfg(path: Path, data_root: Path) -> Config:
    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(data_root)}):
        return Config.fromfile(str(path))


def _load(path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _effective_rank(w: torch.Tensor, rtol: float = 1e-4) -> int:
    s = torch.linalg.svdvals(w.detach().double().reshape(w.shape[0], -1))
    return int((s > rtol * s[0]).sum())


def _scalars(run: Path) -> list:
    return [json.loads(line) for f in glob.glob(str(run / "*" / "vis_data" / "scalars.json")) for line in open(f)]


def _map(text: str) -> str:
    return re.findall(r"pascal_voc/mAP: ([\d.]+)", text)[-1]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    from lrpet_dense.data.toy_voc import make_toy_voc

    root = tmp_path_factory.mktemp("det_toy_voc")
    make_toy_voc(str(root), num_train=6, num_test=3, size=128)
    return root


def _train(config: Path, toy_data: Path, request, name: str) -> Path:
    wd = module_temp(request, name)
    _run([MMDET_TOOLS / "train.py", config, "--work-dir", wd], toy_data, wd)
    return wd


@pytest.fixture(scope="module")
def frcnn_run(toy_data, request) -> Path:
    """mmdet's own tools/train.py on the toy Faster R-CNN config, unchanged: 3 iterations, projections at 2 and 3."""
    return _train(FRCNN_TOY, toy_data, request, "frcnn")


@pytest.fixture(scope="module")
def retina_run(toy_data, request) -> Path:
    return _train(RETINA_TOY, toy_data, request, "retina")


def _compress(config: Path, run: Path, toy_data: Path) -> tuple:
    out = run / "compressed.pth"
    proc = _run(["-m", "lrpet_dense", "compress", "mmdet", config, run / "iter_3.pth", out], toy_data, run)
    return out, proc.stdout


@pytest.fixture(scope="module")
def frcnn_compressed(frcnn_run, toy_data) -> tuple:
    return _compress(FRCNN_TOY, frcnn_run, toy_data)


# -- training ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("which", ["frcnn", "retina"])
def test_training_projects_at_interval_and_end(which, request):
    run = request.getfixturevalue(f"{which}_run")
    scalars = _scalars(run)
    assert sorted(s["step"] for s in scalars if "lrpet/time_s" in s) == [2, 3]
    assert [s for s in scalars if "lrpet/num_projections" in s][-1]["lrpet/num_projections"] == 2
    assert any("pascal_voc/mAP" in s for s in scalars)  # mmdet's VOCMetric ran after training
    ckpt = _load(run / "iter_3.pth")  # a stock mmengine checkpoint loads weights_only (the allow-list)
    plan = RankPlan.from_dict(ckpt["lrpet"]["plan"])
    # every conv of mmdet's ResNet-50 (stem + 48 block + 4 downsample) but layer1.0.conv1 (64 -> 64, 1x1: rank
    # 32 would not save MACs)
    assert len(plan) == 52 and plan.left_dense == ["backbone.layer1.0.conv1"] and plan.ratio == 0.5
    sd = ckpt["state_dict"]
    for name, lp in plan.layers.items():
        assert _effective_rank(sd[name + ".weight"]) <= lp.rank, name
    for name in ("neck.fpn_convs.0.conv.weight", "backbone.layer1.0.conv1.weight"):  # not planned: full rank
        w = sd[name]
        assert _effective_rank(w) == min(w.shape[0], w[0].numel()), name


@pytest.mark.slow
def test_epoch_based_training_projects_at_interval_and_end(toy_data, tmp_path):
    """mmdet's VOC configs train by epochs: the hook counts iterations and projects after the last one there too."""
    cfg = tmp_path / "epochs.py"
    cfg.write_text(f"_base_ = {str(FRCNN_TOY)!r}\n"
                   "train_dataloader = dict(sampler=dict(_delete_=True, type='DefaultSampler', shuffle=True))\n"
                   "train_cfg = dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs=1, val_interval=2)\n"
                   "default_hooks = dict(checkpoint=dict(by_epoch=True, interval=1))\n")
    proc = _run([MMDET_TOOLS / "train.py", cfg, "--work-dir", tmp_path / "wd"], toy_data, tmp_path)
    text = proc.stdout + proc.stderr
    # 6 images, batch 2: 3 iterations in the epoch; interval 2
    assert "LRPET projection 1 after iteration 2" in text and "LRPET projection 2 after iteration 3" in text
    ckpt = _load(tmp_path / "wd" / "epoch_1.pth")
    assert ckpt["lrpet"]["projector"] == {"last_iter": 3, "num_projections": 2}


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(frcnn_run, toy_data, tmp_path):
    # resumed by the same tool in the same environment (thread count included) as the uninterrupted run, so
    # the two runs' float arithmetic is the same and their weights must agree bit for bit
    _run([MMDET_TOOLS / "train.py", FRCNN_TOY, "--work-dir", tmp_path, "--resume", frcnn_run / "iter_2.pth"],
         toy_data, tmp_path)
    resumed, full = _load(tmp_path / "iter_3.pth"), _load(frcnn_run / "iter_3.pth")
    assert resumed["lrpet"] == full["lrpet"] and full["lrpet"]["projector"] == {"last_iter": 3, "num_projections": 2}
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=0, atol=0, msg=k)


# -- compression and evaluation -------------------------------------------------------------------
@pytest.mark.slow
def test_compress_reports_complexity_and_checks_outputs(frcnn_compressed):
    path, out = frcnn_compressed
    assert "factorised 52 of 52" in out and "checked against the dense model in float64" in out
    rows = {line.split()[0] for line in out.splitlines() if line.startswith(("backbone ", "model "))}
    assert rows == {"backbone", "model"} and "model type LRPETFasterRCNN" in out
    ckpt = _load(path)
    assert ckpt["meta"]["lrpet_model_type"] == "LRPETFasterRCNN" and ckpt["meta"]["dataset_meta"]["classes"][0] == \
        "aeroplane"
    assert next(iter(ckpt["state_dict"])).startswith("_lrpet_note: LRPET COMPRESSED CHECKPOINT")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["LRPETFasterRCNN", "FasterRCNN"])
def test_init_detector_loads_the_compressed_checkpoint(frcnn_compressed, frcnn_run, toy_data, model_type):
    """``mmdet.apis.init_detector`` (the LRPET type, and the stock type with lrpet_dense.mmdet imported) builds the
    factorised detector, strictly; its raw outputs (features, RPN and ROI head before NMS) equal the projected dense
    detector's in float64, so this holds on any CPU."""
    from mmdet.apis import inference_detector, init_detector

    path, _ = frcnn_compressed
    ckpt = _load(path)
    cfg = _cfg(FRCNN_TOY, toy_data)
    cfg.model.type = model_type
    fact = init_detector(cfg, str(path), device="cpu")
    assert type(fact).__name__ == model_type
    assert isinstance(fact.backbone.layer3[0].conv2, FactorizedConv2d)
    conv2 = fact.backbone.layer3[0].conv2  # style='pytorch': the 3x3 conv strides; its k x k factor keeps the stride
    assert conv2.conv_a.stride == (2, 2) and conv2.conv_a.kernel_size == (3, 3) and conv2.conv_b.stride == (1, 1)
    assert set(fact.state_dict()) == {k for k in ckpt["state_dict"] if not k.startswith("_lrpet_")}
    assert list(fact.dataset_meta["classes"][:2]) == ["aeroplane", "bicycle"]
    dense, _ = ld.load_model(cfg, str(frcnn_run / "iter_3.pth"))
    x = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    compare_outputs(ld.output_tensors(float64_copy(dense), x), ld.output_tensors(float64_copy(fact), x))
    image = sorted(glob.glob(str(toy_data / "VOCdevkit" / "VOC2007" / "JPEGImages" / "*.jpg")))[-1]
    result = inference_detector(fact, image)
    assert result.pred_instances.bboxes.shape[-1] == 4


@pytest.mark.slow
def test_mmdet_test_tool_evaluates_the_compressed_checkpoint(frcnn_compressed, frcnn_run, toy_data, tmp_path):
    """mmdet's own tools/test.py: the LRPET type and the stock type (the config imports lrpet_dense.mmdet) give the
    same detections, bit for bit; no projection is announced; the dense checkpoint it was made from scores the
    same mAP."""
    import pickle

    path, _ = frcnn_compressed
    stock = tmp_path / "stock.py"
    stock.write_text(f"_base_ = {str(FRCNN_TOY)!r}\nmodel = dict(type='FasterRCNN')\n")
    texts, dumps = [], []
    for i, (cfg, ckpt) in enumerate(((FRCNN_TOY, path), (stock, path), (FRCNN_TOY, frcnn_run / "iter_3.pth"))):
        out = tmp_path / f"dets{i}.pkl"
        proc = _run([MMDET_TOOLS / "test.py", cfg, ckpt, "--work-dir", tmp_path / f"wd{i}", "--out", out], toy_data,
                    tmp_path)
        text = proc.stdout + proc.stderr
        assert "unexpected key" not in text and "missing keys" not in text
        assert "projection starts" not in text and "LRPET: the loaded checkpoint" not in text
        texts.append(text)
        with open(out, "rb") as f:
            dumps.append(pickle.load(f))
    assert _map(texts[0]) == _map(texts[1]) == _map(texts[2])
    assert len(dumps[0]) == len(dumps[1]) == 3
    for a, b in zip(dumps[0], dumps[1]):
        for key in ("bboxes", "scores", "labels"):
            assert torch.equal(a["pred_instances"][key], b["pred_instances"][key]), key


@pytest.mark.slow
def test_stock_detector_without_lrpet_dense_shows_the_note(frcnn_compressed, toy_data, tmp_path):
    """What a user sees who evaluates a compressed checkpoint with a stock config that does not import lrpet_dense:
    mmengine's loader leaves the factorised convs' dense layers as initialised and warns; the first unexpected key it
    prints is the checkpoint's note naming the model type to set."""
    path, _ = frcnn_compressed
    cfg = tmp_path / "plain.py"
    cfg.write_text(f"_base_ = {str(FRCNN_TOY)!r}\nmodel = dict(type='FasterRCNN')\n"
                   "custom_imports = dict(_delete_=True, imports=[])\ncustom_hooks = []\n")
    proc = _run([MMDET_TOOLS / "test.py", cfg, path, "--work-dir", tmp_path / "wd"], toy_data, tmp_path)
    text = proc.stdout + proc.stderr
    first = re.search(r"unexpected key in source state_dict: ([^,]*),", text)
    assert first, text[-3000:]
    assert first.group(1) == ("_lrpet_note: LRPET COMPRESSED CHECKPOINT - build the model with type='LRPETFasterRCNN' "
                              "(custom_imports='lrpet_dense.mmdet'); this model was built without lrpet_dense and got "
                              "NO weights for its factorised convs")
    assert "missing keys in source state_dict: backbone.conv1.weight" in text


@pytest.mark.slow
def test_retinanet_compresses_and_evaluates(retina_run, toy_data, tmp_path):
    path, out = _compress(RETINA_TOY, retina_run, toy_data)
    assert "factorised 52 of 52" in out and "model type LRPETRetinaNet" in out
    maps = []
    for ckpt in (path, retina_run / "iter_3.pth"):
        proc = _run([MMDET_TOOLS / "test.py", RETINA_TOY, ckpt, "--work-dir", tmp_path / ckpt.stem], toy_data, tmp_path)
        assert "unexpected key" not in proc.stdout + proc.stderr
        maps.append(_map(proc.stdout + proc.stderr))
    assert maps[0] == maps[1]
    cfg = _cfg(RETINA_TOY, toy_data)
    dense, _ = ld.load_model(cfg, str(retina_run / "iter_3.pth"))
    fact, _ = ld.load_model(cfg, str(path))
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    compare_outputs(ld.output_tensors(float64_copy(dense), x), ld.output_tensors(float64_copy(fact), x))


@pytest.mark.slow
def test_inference_form_and_onnx_export(frcnn_compressed, toy_data, tmp_path):
    """The inference form (BatchNorms folded, channels_last) computes the loaded model's raw outputs in float32 too
    (mmcv's RoIAlign reads NCHW: it gets contiguous inputs); ``lrpet-dense export mmdet`` writes a file whose raw
    outputs ONNX Runtime computes as PyTorch does, from another folder, for proposals on every FPN level (mmdet's
    ROI extractor pools a level only when it has proposals: a traced graph must not freeze that)."""
    import shutil

    import onnxruntime as ort

    from lrpet_dense.mmdet.model import fixed_rois, flat_tensors, raw_outputs

    path, _ = frcnn_compressed
    cfg = _cfg(FRCNN_TOY, toy_data)
    model, _ = ld.load_model(cfg, str(path))
    x = torch.randn(1, 3, 480, 480, generator=torch.Generator().manual_seed(3))
    rois = fixed_rois(480, 480, 32)
    assert set(model.roi_head.bbox_roi_extractor.map_roi_levels(rois, 4).tolist()) == {0, 1, 2, 3}
    with torch.no_grad():
        loaded = flat_tensors(raw_outputs(model, x, rois))
        ld.to_inference_(model)
        folded = flat_tensors(raw_outputs(model, x, rois))
    compare_outputs(loaded, folded, rtol=1e-3)  # float32 round-off only (a wrong layout differs by O(1))
    out = tmp_path / "det.onnx"
    proc = _run(["-m", "lrpet_dense", "export", "mmdet", FRCNN_TOY, path, out, "--input-size", "480", "480"], toy_data,
                tmp_path)
    assert "ONNX Runtime vs PyTorch on the same input" in proc.stdout and "[[1, 3, 480, 480], [32, 5]]" in proc.stdout
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for f in tmp_path.glob("det.onnx*"):
        shutil.move(str(f), moved / f.name)
    session = ort.InferenceSession(str(moved / "det.onnx"))
    names = [o.name for o in session.get_outputs()]
    assert names[:2] == ["features_0", "features_1"] and names[-2:] == ["roi_cls", "roi_bbox"]
    got = session.run(None, {"image": x.numpy(), "rois": rois.numpy()})
    compare_outputs(folded, [torch.from_numpy(g) for g in got], rtol=1e-4)


@pytest.mark.slow
def test_report(frcnn_compressed, frcnn_run, toy_data, tmp_path):
    path, _ = frcnn_compressed
    proc = _run(["-m", "lrpet_dense", "report", "mmdet", FRCNN_TOY, frcnn_run / "iter_3.pth", path, "--out",
                 tmp_path / "report", "--repeats", "1", "--warmup", "0", "--quiet"], toy_data, tmp_path)
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    acc = data["accuracy"]
    assert acc["metric"] == "pascal_voc/mAP (%)" and acc["dense"] == pytest.approx(acc["factorized"], abs=1e-9)
    assert "random boxes" in acc["chance_method"] and "(mmdetection)" in data["title"]
    assert data["title"].startswith("Faster R-CNN ResNet-50-FPN")
    assert "report written to" in proc.stdout


@pytest.mark.slow
def test_bad_hook_option_fails_when_the_runner_is_built(toy_data, tmp_path):
    """mmdet's own tools/train.py with a bad option: one clear error (key, value, allowed range) while the runner is
    being built, before any data loader, weight initialisation or training; the config is not even dumped."""
    proc = _run([MMDET_TOOLS / "train.py", FRCNN_TOY, "--work-dir", tmp_path, "--cfg-options",
                 "custom_hooks.0.ratio=1.5"], toy_data, tmp_path, ok=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"ValueError: LRPETHook: ratio must lie in \[0, 1\) .*got 1\.5", text), text[-3000:]
    assert "Iter(train)" not in text and "LRPET selection" not in text
    assert not list(tmp_path.glob("*.py")) and not list(tmp_path.glob("*.pth"))


# -- pairing, plan and options (no training) --------------------------------------------------
@pytest.fixture(scope="module")
def full_frcnn():
    init_default_scope("mmdet")
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(FRCNN_FULL))
    cfg.model.backbone.init_cfg = None  # no download
    return cfg, MODELS.build(cfg.model)


def test_full_configs_are_mmdets_voc_configs_with_the_hook(tmp_path):
    for path, model_type, base in ((FRCNN_FULL, "LRPETFasterRCNN", "faster-rcnn_r50_fpn_1x_voc0712.py"),
                                   (RETINA_FULL, "LRPETRetinaNet", "retinanet_r50_fpn_1x_voc0712.py")):
        cfg = Config.fromfile(str(path))
        (tmp_path / base).write_text(f"_base_ = 'mmdet::pascal_voc/{base}'\n")  # read as ours is (scope marks)
        stock = Config.fromfile(str(tmp_path / base))
        assert cfg.model.type == model_type and cfg.custom_imports.imports == ["lrpet_dense.mmdet"]
        assert ld.lrpet_config(cfg).target_macs_cut == 0.3
        for key in ("train_dataloader", "test_dataloader", "test_evaluator", "train_cfg", "param_scheduler",
                    "optim_wrapper"):
            assert cfg[key] == stock[key], key
        cfg.model.type = stock.model.type
        assert cfg.model == stock.model


def test_pairing_mmdet_resnet_fpn(full_frcnn):
    _, model = full_frcnn
    pairing = ld.pair_convs(model, LRPETConfig(include=("*",), include_frozen=True))
    by = {p.name: p for p in pairing.layers}
    assert by["backbone.conv1"].bn is model.backbone.bn1  # the plain stem: sibling norm1_name
    assert by["backbone.layer1.0.conv3"].bn is model.backbone.layer1[0].bn3
    assert by["backbone.layer2.0.downsample.0"].bn is model.backbone.layer2[0].downsample[1]
    # FPN, RPN and ROI convs have no norm: projected without rectification when selected
    assert "neck.fpn_convs.0.conv" in pairing.unpaired and "rpn_head.rpn_conv" in pairing.unpaired
    default = ld.pair_convs(model)  # backbone.*, frozen_stages=1: the stem and layer1 are frozen, left out
    assert len(default.layers) == 53 - 11 and "backbone.layer1.0.conv1" in default.frozen_skipped
    assert all(n.startswith("backbone.layer") and not n.startswith("backbone.layer1.") for n in default.names)


def test_full_config_plans_a_30_percent_backbone_cut(full_frcnn):
    cfg, model = full_frcnn
    config = ld.lrpet_config(cfg)
    assert ld.default_plan_hw(model, cfg) == (600, 600)  # the short side of VOC's test scale (1000, 600)
    plan = ld.build_plan(model, ld.pair_convs(model, config).layers, config, ld.default_plan_hw(model, cfg))
    assert 0.30 <= plan.reached_macs_cut < 0.31
    from lrpet_dense.core.selection import conv_macs_of, conv_names, output_sizes

    names = conv_names(model, "backbone.")
    sizes = output_sizes(model, names, lambda: model.backbone(torch.zeros(1, 3, 608, 608)))  # padded to 32
    assert plan.reference_macs == conv_macs_of(model, names, sizes)  # frozen stem and layer1 included


def test_the_config_hook_is_the_shared_one_in_the_mmdet_scope():
    from mmengine.registry import HOOKS

    from lrpet_dense.openmmlab import LRPETHook, adapter_for

    init_default_scope("mmdet")
    hook = HOOKS.build(dict(type="LRPETHook", ratio=0.4, interval=7))
    assert type(hook) is LRPETHook and hook.config.ratio == 0.4 and hook.config.interval == 7
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(RETINA_FULL))
    cfg.model.backbone.init_cfg = None
    assert adapter_for(MODELS.build(cfg.model)) is ld.ADAPTER


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=1.5), r"ratio must lie in \[0, 1\) .*got 1\.5"),
    (dict(target_macs_cut=1.0), r"target_macs_cut must lie in \(0, 1\).*got 1\.0"),
    (dict(ratio=0.5, interval=0), r"interval must be an integer >= 1.*got 0"),
    (dict(ratoi=0.5), r"unknown option\(s\) \['ratoi'\]"),
])
def test_hook_validates_arguments_at_construction(kwargs, match):
    from mmengine.registry import HOOKS

    init_default_scope("mmdet")
    with pytest.raises(ValueError, match="^LRPETHook: " + match):
        HOOKS.build(dict(type="LRPETHook", **kwargs))


@pytest.mark.slow
def test_search_two_trials(toy_data, tmp_path):
    """LRPET-S on the toy Faster R-CNN: two short trials through mmengine's runner, each factorised (checked) and
    scored by mmdet's VOCMetric; the report gives the best ratios as the hook's overrides."""
    out = tmp_path / "search"
    _run(["-m", "lrpet_dense", "search", "mmdet", FRCNN_TOY, "--out", out, "--trials", "2", "--trial-iters", "2",
          "--startup-trials", "1", "--sampler", "tpe"], toy_data, tmp_path)
    summary = json.loads((out / "search.json").read_text())
    done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 2 and summary["metric"] == "box mAP (%)"
    assert all(0.0 <= t["box mAP (%)"] <= 100.0 for t in done)
    report = (out / "search.md").read_text()
    assert "mmseg, mmdet:" in report and "backbone.layer3.*" in report


def test_quickstart_config_is_the_toy_one_trained_longer(tmp_path):
    toy = _cfg(FRCNN_TOY, tmp_path)
    qs = _cfg(Path(config_path("toy/faster-rcnn_r50_fpn_lrpet_quickstart.py")), tmp_path)
    assert qs.train_cfg.max_iters == 100 and ld.lrpet_config(qs).interval == 25
    assert qs.model.train_cfg.rpn.sampler.num == 256 and toy.model.train_cfg.rpn.sampler.num == 8192
    qs.model.train_cfg.rpn.sampler.num = 8192
    assert qs.model == toy.model and qs.train_dataloader == toy.train_dataloader
