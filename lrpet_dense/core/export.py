"""ONNX export of a (compressed) model, checked in ONNX Runtime against PyTorch.

The frameworks' adapters decide *what* is exported (mmseg: the segmentor in ``mode='tensor'``, through
``torch.onnx.export``'s dynamo exporter; detectron2: its own ``TracingAdapter`` path, through the
TorchScript exporter as detectron2's ``export_model.py`` does); this module writes the file
atomically, runs it in ONNX Runtime and compares every output with PyTorch's (:func:`check_onnx`).
``onnx`` and ``onnxruntime`` (and ``onnxscript`` for the dynamo exporter) are the ``export`` extra.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["export_onnx", "export_aligned", "check_onnx", "ort_session", "ort_runner"]

logger = logging.getLogger(__name__)


def _need(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs {module!r}: pip install 'lrpet-dense[export]' (onnx, onnxruntime, "
                          "onnxscript)") from e


def export_onnx(module: torch.nn.Module, args: Tuple[torch.Tensor, ...], path: str, *, dynamo: bool,
                opset: int = 17, input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None,
                check: Optional[Callable[[str], Dict[str, float]]] = None) -> Dict[str, float]:
    """``torch.onnx.export`` of ``module(*args)`` to ``path``, checked by ``onnx`` and by ``check`` (e.g.
    :func:`check_onnx` against PyTorch's outputs) before it is moved into place: a file that fails a
    check is never written to ``path``.

    Returns:
        What ``check`` returns (``{}`` without one).
    """
    onnx = _need("onnx")
    if dynamo:
        _need("onnxscript")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        module.eval()
        with torch.no_grad():
            torch.onnx.export(module, args, tmp, opset_version=opset, dynamo=dynamo, input_names=input_names,
                              output_names=output_names)
        module.eval()  # the TorchScript exporter restores the modes it found: keep inference mode
        onnx.checker.check_model(tmp)
        result = check(tmp) if check is not None else {}
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result


def export_aligned(model: torch.nn.Module, wrap: Callable[[torch.nn.Module], torch.nn.Module],
                   args: Tuple[torch.Tensor, ...], path: str, *, align_ranks: int = 16, dynamo: bool, opset: int = 17,
                   input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None,
                   compare: Optional[Callable[[torch.nn.Module, List[Any], List[torch.Tensor]], Dict[str, float]]] = None
                   ) -> Dict[str, Any]:
    """:func:`export_onnx` of ``wrap(model)`` with the factorised ranks zero-padded to multiples of
    ``align_ranks`` (on a copy: :func:`~lrpet_dense.core.deploy.aligned_for_export`; 1: unpadded), the file
    checked in ONNX Runtime against ``wrap(model)``'s own outputs: the model given, unpadded.

    Args:
        wrap: builds the module that is exported from a model (a framework's tracing wrapper).
        compare: ``compare(exported module, ONNX Runtime outputs, reference)`` instead of
            :func:`check_onnx`'s output-by-output check.

    Returns:
        ``{"reference": [PyTorch outputs], "check": {...}, "aligned": [padded conv names]}``.
    """
    from .deploy import aligned_for_export

    with torch.no_grad():
        out = wrap(model).eval()(*args)
    reference = list(out) if isinstance(out, (tuple, list)) else [out]
    exported, aligned = aligned_for_export(model, align_ranks)
    module = wrap(exported).eval()
    by = None if compare is None else (lambda outs, ref: compare(module, outs, ref))  # noqa: E731
    check = export_onnx(module, args, path, dynamo=dynamo, opset=opset, input_names=input_names,
                        output_names=output_names, check=lambda f: check_onnx(f, list(args), reference, compare=by))
    return {"reference": reference, "check": check, "aligned": aligned}


def ort_session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime CPU session (``threads`` intra-op threads, default ORT's)."""
    ort = _need("onnxruntime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def check_onnx(path: str, inputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], *, rtol: float = 1e-4,
               atol: float = 1e-4, compare: Optional[Callable[[List[Any], List[torch.Tensor]], Dict[str, float]]] = None
               ) -> Dict[str, float]:
    """Run the ONNX file in ONNX Runtime and compare its outputs with PyTorch's ``reference``.

    By default every output must have the reference's shape and ``|ort - torch| <= atol + rtol * max|torch|``
    (float32 tolerance: ORT's kernels are not PyTorch's); ``compare`` replaces that check (e.g. for
    detections, whose order may differ between equal scores).

    Returns:
        ``{output index: max abs difference}`` (or what ``compare`` returns).

    Raises:
        ValueError: an output differs.
    """
    import numpy as np

    session = ort_session(path)
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    outs = session.run(None, feeds)
    if compare is not None:
        return compare(outs, list(reference))
    if len(outs) != len(reference):
        raise ValueError(f"{path}: ONNX Runtime returns {len(outs)} outputs, PyTorch {len(reference)}")
    diffs = {}
    for i, (o, r) in enumerate(zip(outs, reference)):
        r = r.detach().cpu().numpy()
        if o.shape != r.shape:
            raise ValueError(f"{path}: output {i} has shape {o.shape} in ONNX Runtime, {r.shape} in PyTorch")
        d = float(np.abs(o.astype(np.float64) - r.astype(np.float64)).max()) if o.size else 0.0
        bound = atol + rtol * (float(np.abs(r).max()) if r.size else 0.0)
        if d > bound:
            raise ValueError(f"{path}: output {i} differs from PyTorch's by {d:.3g} (> {bound:.3g}) in ONNX Runtime")
        diffs[str(i)] = d
    return diffs


def ort_runner(path: str, inputs: Sequence[torch.Tensor], threads: Optional[int] = None) -> Callable[[], List[Any]]:
    """A zero-argument callable running the ONNX file on ``inputs`` in ONNX Runtime (``threads`` intra-op
    threads): what benchmarks time, interleaved with other runners so that they share the machine's state."""
    session = ort_session(path, threads)
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feeds)
