"""Ordinary checkpoints, written by the frameworks' stock runners without any LRPET hook, load everywhere
with ``torch.load(weights_only=True)``: the framework's own evaluation tool, LRPET fine-tuning from them,
and our compression tool. A checkpoint holding a class that is not allow-listed is refused, naming it."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import D2_TINY, D2_TOY_CFG, REPO, SEG_TOY_CFG, mmseg_tools, module_temp, run_tool, seg_env

pytestmark = pytest.mark.timeout(900)


def _run(args, env, cwd):
    proc = subprocess.run([sys.executable, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=420)
    return proc.returncode, proc.stdout + proc.stderr


# =============================================================================== mmseg
@pytest.fixture(scope="module")
def seg_stock_ckpt(seg_toy_data, request):
    """A checkpoint written by mmseg's tools/train.py with a config that imports nothing of ours (stock
    ``EncoderDecoder``, no custom hooks): message hub with ``HistoryBuffer``s, numpy values in meta."""
    pytest.importorskip("mmseg")
    wd = module_temp(request, "seg_stock")
    cfg = wd / "stock.py"
    cfg.write_text(f"_base_ = {str(SEG_TOY_CFG)!r}\ncustom_imports = dict(imports=[], allow_failed_imports=False)\n"
                   "custom_hooks = []\nmodel = dict(type='EncoderDecoder')\n"
                   "default_hooks = dict(checkpoint=dict(interval=3))\n")
    env = dict(seg_env(seg_toy_data))
    env["PYTHONPATH"] = ""  # the plugin cannot be imported by the writing run
    code, text = _run([mmseg_tools() / "train.py", cfg, "--work-dir", wd], env, wd)
    assert code == 0, text[-4000:]
    ckpt = wd / "iter_3.pth"
    with zipfile.ZipFile(ckpt) as z:  # really a stock mmengine checkpoint: it pickles HistoryBuffer objects
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"mmengine.logging.history_buffer" in pkl and b"getattr" in pkl
    return ckpt


@pytest.mark.slow
def test_seg_stock_checkpoint_evaluated_by_mmseg_test_tool(seg_stock_ckpt, seg_toy_data, tmp_path):
    # the LRPET toy config imports the plugin (custom_imports): mmseg's own test.py reads the checkpoint
    code, text = _run([mmseg_tools() / "test.py", SEG_TOY_CFG, seg_stock_ckpt, "--work-dir", tmp_path],
                      seg_env(seg_toy_data), tmp_path)
    assert code == 0, text[-3000:]
    assert re.search(r"mIoU: [\d.]+", text)


@pytest.mark.slow
def test_seg_stock_checkpoint_starts_lrpet_fine_tuning(seg_stock_ckpt, seg_toy_data, tmp_path):
    code, text = _run([mmseg_tools() / "train.py", SEG_TOY_CFG, "--work-dir", tmp_path, "--cfg-options",
                       f"load_from={seg_stock_ckpt}"], seg_env(seg_toy_data), tmp_path)
    assert code == 0, text[-3000:]
    assert "Load checkpoint from" in text and "LRPET projection 2 after iteration 3" in text
    import lrpet_dense.mmseg  # noqa: F401
    ckpt = torch.load(tmp_path / "iter_3.pth", map_location="cpu", weights_only=True)
    assert ckpt["lrpet"]["projector"]["num_projections"] == 2


@pytest.mark.slow
def test_seg_stock_checkpoint_compressed_by_our_tool(seg_stock_ckpt, seg_toy_data, tmp_path):
    out = tmp_path / "c.pth"
    text = run_tool(["tools/compress_seg.py", SEG_TOY_CFG, seg_stock_ckpt, out, "--ratio", "0.5", "--project"],
                    {"LRPET_TOY_VOC_ROOT": str(seg_toy_data)})
    assert "factorised 54 of 54" in text and out.exists()


@pytest.mark.slow
def test_seg_checkpoint_with_other_class_is_refused(seg_stock_ckpt, seg_toy_data, tmp_path):
    import lrpet_dense.mmseg  # noqa: F401

    ckpt = torch.load(seg_stock_ckpt, map_location="cpu", weights_only=True)
    ckpt["meta"]["args"] = argparse.Namespace(lr=0.1)  # a class no allow-list covers
    bad = tmp_path / "bad.pth"
    torch.save(ckpt, bad)
    env = dict(os.environ, LRPET_TOY_VOC_ROOT=str(seg_toy_data))
    code, text = _run(["tools/compress_seg.py", SEG_TOY_CFG, bad, tmp_path / "c.pth", "--ratio", "0.5", "--project"],
                      env, REPO)
    assert code == 2
    errors = [l for l in text.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "it needs argparse.Namespace" in errors[0] and "neither plain data" in errors[0]
    code, text = _run([mmseg_tools() / "test.py", SEG_TOY_CFG, bad, "--work-dir", tmp_path], seg_env(seg_toy_data),
                      tmp_path)
    assert code != 0 and "argparse.Namespace" in text  # torch's own refusal, in mmseg's own tool
    with pytest.raises(Exception, match="getattr"):  # the restricted getattr refuses anything but the 4 methods
        from lrpet_dense.mmseg.checkpoint import history_buffer_getattr
        history_buffer_getattr(torch, "load")


# =============================================================================== detectron2
_STOCK_TRAIN = """
import sys
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer
from lrpet_dense.detectron2 import add_lrpet_config, register_toy_voc_from_env
cfg = get_cfg()
add_lrpet_config(cfg)  # the toy config file has LRPET keys; they stay off
cfg.merge_from_file(sys.argv[1])
cfg.merge_from_list(sys.argv[2:])
cfg.freeze()
register_toy_voc_from_env()
trainer = DefaultTrainer(cfg)  # detectron2's own trainer: no LRPET hook, no RNG hook
trainer.resume_or_load(resume=False)
trainer.train()
"""


@pytest.fixture(scope="module")
def d2_stock_ckpt(d2_toy_voc, request):
    pytest.importorskip("detectron2")
    out = module_temp(request, "d2_stock")
    script = out / "stock_train.py"
    script.write_text(_STOCK_TRAIN)
    env = dict(os.environ, LRPET_TOY_VOC=d2_toy_voc, PYTHONPATH=str(REPO))
    code, text = _run([script, D2_TOY_CFG, *D2_TINY, "SOLVER.MAX_ITER", "2", "LRPET.ENABLED", "False",
                       "MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "TEST.PRECISE_BN.ENABLED", "False",
                       "OUTPUT_DIR", out], env, out)
    assert code == 0, text[-4000:]
    return out / "model_final.pth"


@pytest.mark.slow
def test_d2_stock_checkpoint_evaluated_by_train_det(d2_stock_ckpt, d2_toy_voc, tmp_path):
    text = run_tool(["tools/train_det.py", "--config", D2_TOY_CFG, "--eval-only", *D2_TINY, "MODEL.WEIGHTS",
                     d2_stock_ckpt, "OUTPUT_DIR", tmp_path], {"LRPET_TOY_VOC": d2_toy_voc})
    assert re.search(r"copypaste: [\d.naN]+,[\d.naN]+,[\d.naN]+", text)


@pytest.mark.slow
def test_d2_stock_checkpoint_starts_lrpet_fine_tuning(d2_stock_ckpt, d2_toy_voc, tmp_path):
    text = run_tool(["tools/train_det.py", "--config", D2_TOY_CFG, *D2_TINY, "SOLVER.MAX_ITER", "2",
                     "MODEL.WEIGHTS", d2_stock_ckpt, "OUTPUT_DIR", tmp_path], {"LRPET_TOY_VOC": d2_toy_voc})
    assert "LRPET projection at step 2" in text
    ckpt = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["hooks"]["LRPETHook"]["projector"]["num_projections"] == 1


@pytest.mark.slow
def test_d2_stock_checkpoint_compressed_by_our_tool(d2_stock_ckpt, d2_toy_voc, tmp_path):
    out = tmp_path / "c.pth"
    text = run_tool(["tools/compress_det.py", "--config", D2_TOY_CFG, "--checkpoint", d2_stock_ckpt, "--output", out,
                     "--plan-from-config", "--project", "--no-flops", *D2_TINY], {"LRPET_TOY_VOC": d2_toy_voc})
    assert re.search(r"factorised \d+ of \d+ planned convs", text) and out.exists()


@pytest.mark.slow
def test_d2_checkpoint_with_other_class_is_refused(d2_stock_ckpt, d2_toy_voc, tmp_path):
    ckpt = torch.load(d2_stock_ckpt, map_location="cpu", weights_only=True)
    ckpt["args"] = argparse.Namespace(lr=0.1)
    bad = tmp_path / "bad.pth"
    torch.save(ckpt, bad)
    env = dict(os.environ, LRPET_TOY_VOC=d2_toy_voc)
    code, text = _run(["tools/compress_det.py", "--config", D2_TOY_CFG, "--checkpoint", bad, "--output",
                       tmp_path / "c.pth", "--plan-from-config", "--project", "--no-flops", *D2_TINY], env, REPO)
    assert code == 2
    errors = [l for l in text.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "argparse.Namespace" in errors[0]
    assert not (tmp_path / "c.pth").exists()


def test_no_fallback_to_unsafe_loading():
    """Nothing in the package or the tools loads with weights_only=False or unpickles by hand."""
    files = list((REPO / "lrpet_dense").rglob("*.py")) + list((REPO / "tools").glob("*.py"))
    offenders = [str(f.relative_to(REPO)) for f in files
                 if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(|TORCH_FORCE_NO_WEIGHTS_ONLY", f.read_text())]
    assert not offenders, offenders


def test_allow_list_is_what_stock_checkpoints_need():
    """The allow-list holds HistoryBuffer, numpy's reconstructors and a restricted getattr, nothing broader."""
    import lrpet_dense.mmseg  # noqa: F401
    from torch._weights_only_unpickler import _get_user_allowed_globals

    allowed = _get_user_allowed_globals()
    assert allowed["builtins.getattr"] is not getattr
    assert "mmengine.logging.history_buffer.HistoryBuffer" in allowed
    assert "numpy._core.multiarray._reconstruct" in allowed or "numpy.core.multiarray._reconstruct" in allowed
    assert not any(k.startswith(("os.", "subprocess.", "posix.")) or k in ("builtins.eval", "builtins.exec")
                   for k in allowed)
