"""The files an ONNX export writes: named after the output, self-contained (the weights inside the
``.onnx`` up to protobuf's 2 GB; above it in ``NAME.onnx.data`` beside it), with the umask's mode, checked
in ONNX Runtime before they are moved into place, no temporary left behind on success or failure; and
they run in ONNX Runtime after being moved to another folder (plain PyTorch, detectron2, mmseg)."""
from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from conftest import D2_TINY, D2_TOY_CFG, SEG_TOY_CFG

pytestmark = pytest.mark.timeout(600)
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lrpet_dense.core import export as core_export  # noqa: E402


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)).eval()


def _external_locations(path: Path) -> set:
    model = onnx.load(str(path), load_external_data=False)
    return {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for entry in t.external_data if entry.key == "location"}


def _run_moved(files, dest: Path, inputs):
    """Move ``files`` (the .onnx first) to ``dest`` and run the .onnx there; the source folder must then be empty."""
    dest.mkdir()
    source = Path(files[0]).parent
    for f in files:
        shutil.move(str(f), str(dest / Path(f).name))
    assert not os.listdir(source), f"files left beside the export: {os.listdir(source)}"
    session = core_export.ort_session(str(dest / Path(files[0]).name), threads=1)
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})


def test_plain_export_is_one_self_contained_file_that_runs_where_it_is_moved(tmp_path):
    import lrpet_dense as lrpet

    model, x = _net(), torch.randn(1, 3, 16, 16)
    out = tmp_path / "out" / "net.onnx"
    result = lrpet.export_onnx(model, str(out), x)
    assert result["files"] == [str(out)]
    assert sorted(os.listdir(out.parent)) == ["net.onnx"]  # no .data, no hidden temporary
    assert stat.S_IMODE(out.stat().st_mode) == _umask_mode()
    assert _external_locations(out) == set()
    with torch.no_grad():
        expected = model(x)
    (moved,) = _run_moved(result["files"], tmp_path / "elsewhere", [x])
    core_export.compare_onnx_outputs([moved], [expected], "the moved file")


def test_above_the_protobuf_limit_the_weights_go_to_name_onnx_data_beside_it(tmp_path, monkeypatch):
    """The 2 GB limit lowered to 1 kB: the weights go to ``NAME.onnx.data``, referenced by that name only,
    both files moved into place and runnable together elsewhere; a later self-contained export of the same
    name removes the stale data file."""
    import lrpet_dense as lrpet

    model, x = _net(), torch.randn(1, 3, 16, 16)
    out = tmp_path / "out" / "net.onnx"
    monkeypatch.setattr(core_export, "PROTOBUF_LIMIT", 1024)
    result = lrpet.export_onnx(model, str(out), x)
    data = tmp_path / "out" / "net.onnx.data"
    assert result["files"] == [str(out), str(data)]
    assert sorted(os.listdir(out.parent)) == ["net.onnx", "net.onnx.data"]
    assert _external_locations(out) == {"net.onnx.data"}
    assert all(stat.S_IMODE(p.stat().st_mode) == _umask_mode() for p in (out, data))
    monkeypatch.setattr(core_export, "PROTOBUF_LIMIT", 2 ** 31 - 1)
    again = lrpet.export_onnx(model, str(out), x)
    assert again["files"] == [str(out)] and sorted(os.listdir(out.parent)) == ["net.onnx"]
    monkeypatch.setattr(core_export, "PROTOBUF_LIMIT", 1024)
    result = lrpet.export_onnx(model, str(out), x)
    with torch.no_grad():
        expected = model(x)
    (moved,) = _run_moved(result["files"], tmp_path / "elsewhere", [x])
    core_export.compare_onnx_outputs([moved], [expected], "the moved files")


def test_a_failed_export_writes_nothing_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A check that fails, or an exporter that dies half-way, leaves the folder as it was: an earlier file of
    the same name untouched, nothing new, nothing hidden."""
    import torch.onnx as torch_onnx

    model, x = _net(), torch.randn(1, 3, 16, 16)
    folder = tmp_path / "out"
    folder.mkdir()
    earlier = folder / "net.onnx"
    earlier.write_bytes(b"an earlier export")

    def failing_check(path):
        assert Path(path).name == "net.onnx" and Path(path).parent != folder  # checked in a folder of its own
        raise ValueError("output 0 differs")

    with pytest.raises(ValueError, match="output 0 differs"):
        core_export.export_onnx(model, (x,), str(earlier), dynamo=True, opset=18, check=failing_check)
    assert sorted(os.listdir(folder)) == ["net.onnx"] and earlier.read_bytes() == b"an earlier export"

    real = torch_onnx.export

    def dies_half_way(module, args, f, **kwargs):
        real(module, args, f, **kwargs)  # the graph and its .data are written ...
        raise RuntimeError("exporter crashed")  # ... then it fails

    monkeypatch.setattr(torch_onnx, "export", dies_half_way)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        core_export.export_onnx(model, (x,), str(folder / "other.onnx"), dynamo=True, opset=18)
    assert sorted(os.listdir(folder)) == ["net.onnx"]
    with pytest.raises(ValueError, match="is a folder"):
        core_export.export_onnx(model, (x,), str(folder), dynamo=True, opset=18)


def _exported_files(text: str):
    m = re.search(r"^wrote (\S+?)(?: and its weights (\S+?))?[: ]", text, re.M)
    assert m, text[-2000:]
    return [f for f in m.groups() if f]


@pytest.mark.slow
def test_detectron2_export_runs_where_it_is_moved(d2_small_ckpts, tmp_path, capsys):
    from lrpet_dense.cli import main

    out = tmp_path / "out" / "det.onnx"
    assert main(["export", "det", "--config", str(D2_TOY_CFG), "--checkpoint", str(d2_small_ckpts[0]), "--output",
                 str(out), "--input-size", "96", "128", *D2_TINY]) == 0
    files = _exported_files(capsys.readouterr().out)
    assert files == [str(out)] and sorted(os.listdir(out.parent)) == ["det.onnx"]
    assert stat.S_IMODE(out.stat().st_mode) == _umask_mode()
    image = torch.rand(3, 96, 128) * 255
    here = core_export.ort_session(str(out), threads=1)
    before = here.run(None, {here.get_inputs()[0].name: image.numpy()})
    after = _run_moved(files, tmp_path / "elsewhere", [image])
    assert len(after) == len(before) == 4  # boxes, classes, scores, image size
    for a, b in zip(after, before):
        assert a.shape == b.shape and (a == b).all()  # the same file, the same runtime: the same detections


@pytest.mark.slow
def test_mmseg_export_runs_where_it_is_moved(seg_small_ckpts, tmp_path, capsys):
    """The dynamo exporter keeps the weights in a separate file; the file written holds them."""
    import lrpet_dense.mmseg as lm
    from lrpet_dense.cli import main
    from lrpet_dense.cli.common import seg_config

    out = tmp_path / "out" / "seg.onnx"
    with mock.patch.dict(os.environ, {"LRPET_TOY_VOC_ROOT": str(tmp_path)}):
        assert main(["export", "seg", str(SEG_TOY_CFG), str(seg_small_ckpts[0]), str(out), "--input-size", "64",
                     "64"]) == 0
        cfg = seg_config(str(SEG_TOY_CFG))
    files = _exported_files(capsys.readouterr().out)
    assert files == [str(out)] and sorted(os.listdir(out.parent)) == ["seg.onnx"]
    assert _external_locations(out) == set()
    model, _ = lm.load_model(cfg, str(seg_small_ckpts[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x, mode="tensor")
    (moved,) = _run_moved(files, tmp_path / "elsewhere", [x])
    core_export.compare_onnx_outputs([moved], [expected], "the moved seg.onnx")
