"""ONNX export of a (compressed) model, checked in ONNX Runtime against PyTorch.

The frameworks' adapters decide *what* is exported (mmseg: the segmentor in ``mode='tensor'``, through
``torch.onnx.export``'s dynamo exporter; detectron2: its own ``TracingAdapter`` path, through the
TorchScript exporter as detectron2's ``export_model.py`` does); this module writes the file
atomically, runs it in ONNX Runtime and compares every output with PyTorch's (:func:`compare_onnx_outputs`,
or the adapter's own check).
``onnx`` and ``onnxruntime`` (and ``onnxscript`` for the dynamo exporter) are the ``export`` extra.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["export_onnx", "export_aligned", "compare_onnx_outputs", "run_onnx", "ort_session", "ort_runner"]

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
    :func:`compare_onnx_outputs` against PyTorch's) before it is moved into place: a file that fails a
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
                   compare: Optional[Callable[[torch.nn.Module, List[Any], List[torch.Tensor]], Dict[str, float]]] = None,
                   internal_outputs: int = 0) -> Dict[str, Any]:
    """:func:`export_onnx` of ``wrap(model)`` with the factorised ranks zero-padded to multiples of
    ``align_ranks`` (on a copy: :func:`~lrpet_dense.core.deploy.aligned_for_export`; 1: unpadded), the file
    checked in ONNX Runtime against ``wrap(model)``'s own outputs: the model given, unpadded.

    Args:
        wrap: builds the module that is exported from a model (a framework's tracing wrapper).
        compare: ``compare(exported module, ONNX Runtime outputs, reference)`` instead of
            :func:`compare_onnx_outputs`' output-by-output check.
        internal_outputs: the module's last ``internal_outputs`` outputs are intermediate tensors that
            ``compare`` checks (e.g. the continuous values before each discrete step of a detector); the
            file written leaves them out (``onnx.utils.extract_model``: the same nodes, fewer outputs), and
            ONNX Runtime's outputs of that file must equal, bit for bit, those the checked graph gave.

    Returns:
        ``{"reference": [PyTorch outputs, internal ones left out], "check": {...}, "aligned": [padded conv names]}``.
    """
    from .deploy import aligned_for_export

    with torch.no_grad():
        out = wrap(model).eval()(*args)
    reference = list(out) if isinstance(out, (tuple, list)) else [out]
    if not 0 <= internal_outputs < len(reference):
        raise ValueError(f"internal_outputs={internal_outputs}: the module returns {len(reference)} outputs")
    exported, aligned = aligned_for_export(model, align_ranks)
    module = wrap(exported).eval()

    def check(f: str) -> Dict[str, float]:
        outs = run_onnx(f, args)
        result = compare(module, outs, reference) if compare is not None else compare_onnx_outputs(outs, reference, f)
        if internal_outputs:
            _drop_last_outputs(f, internal_outputs)
            _same_outputs(f, run_onnx(f, args), outs[:len(outs) - internal_outputs])
        return result

    result = export_onnx(module, args, path, dynamo=dynamo, opset=opset, input_names=input_names,
                         output_names=output_names, check=check)
    return {"reference": reference[:len(reference) - internal_outputs], "check": result, "aligned": aligned}


def _drop_last_outputs(path: str, n: int) -> None:
    """Rewrite the ONNX file at ``path`` without its last ``n`` graph outputs, and without the nodes that only
    they needed (nodes read in subgraphs, e.g. a ``Loop``'s body, count as needed)."""
    onnx = _need("onnx")
    model = onnx.load(path)
    graph = model.graph
    del graph.output[len(graph.output) - n:]
    while True:
        needed = {o.name for o in graph.output} | _names_read(graph)
        dead = [i for i, node in enumerate(graph.node) if not any(o in needed for o in node.output if o)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    used = _names_read(graph)
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _names_read(graph) -> set:
    """Every value name a node of ``graph`` or of its subgraphs reads."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _names_read(sub)
    return names


def _same_outputs(path: str, outs: List[Any], expected: List[Any]) -> None:
    import numpy as np

    if len(outs) != len(expected):
        raise ValueError(f"{path}: {len(outs)} outputs without the internal ones, expected {len(expected)}")
    for i, (o, e) in enumerate(zip(outs, expected)):
        if not np.array_equal(o, e):  # shapes too
            raise ValueError(f"{path}: output {i} changed when the internal outputs were left out of the file "
                             f"(ONNX Runtime ran the same nodes differently)")


def ort_session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime CPU session (``threads`` intra-op threads, default ORT's)."""
    ort = _need("onnxruntime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx(path: str, inputs: Sequence[torch.Tensor]) -> List[Any]:
    """The ONNX file's outputs (numpy arrays) in ONNX Runtime on ``inputs``."""
    session = ort_session(path)
    return session.run(None, _feeds(session, inputs))


def compare_onnx_outputs(outs: Sequence[Any], reference: Sequence[torch.Tensor], what: str = "ONNX Runtime", *,
                         rtol: float = 1e-4, atol: float = 1e-4) -> Dict[str, float]:
    """Every ONNX Runtime output must have the reference's shape and ``|ort - torch| <= atol + rtol *
    max|torch|`` (float32 tolerance: ORT's kernels are not PyTorch's). For continuous values only: an
    output after a discrete step (NMS, top-k, argmax) may legitimately differ where float32 rounding
    breaks a near-tie.

    Returns:
        ``{output index: max abs difference}``.

    Raises:
        ValueError: an output differs, naming ``what`` and the output.
    """
    import numpy as np

    if len(outs) != len(reference):
        raise ValueError(f"{what}: ONNX Runtime returns {len(outs)} outputs, PyTorch {len(reference)}")
    diffs = {}
    for i, (o, r) in enumerate(zip(outs, reference)):
        o = np.asarray(o)
        r = r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else np.asarray(r)
        if o.shape != r.shape:
            raise ValueError(f"{what}: output {i} has shape {o.shape} in ONNX Runtime, {r.shape} in PyTorch")
        d = float(np.abs(o.astype(np.float64) - r.astype(np.float64)).max()) if o.size else 0.0
        bound = atol + rtol * (float(np.abs(r).max()) if r.size else 0.0)
        if d > bound:
            raise ValueError(f"{what}: output {i} differs from PyTorch's by {d:.3g} (> {bound:.3g}) in ONNX Runtime")
        diffs[str(i)] = d
    return diffs


def ort_runner(path: str, inputs: Sequence[torch.Tensor], threads: Optional[int] = None) -> Callable[[], List[Any]]:
    """A zero-argument callable running the ONNX file on ``inputs`` in ONNX Runtime (``threads`` intra-op
    threads): what benchmarks time, interleaved with other runners so that they share the machine's state."""
    session = ort_session(path, threads)
    feeds = _feeds(session, inputs)
    return lambda: session.run(None, feeds)


def _feeds(session, inputs: Sequence[torch.Tensor]) -> Dict[str, Any]:
    return {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
