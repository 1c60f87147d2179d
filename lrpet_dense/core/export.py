"""ONNX export of a (compressed) model, checked in ONNX Runtime against PyTorch.

The frameworks' adapters decide *what* is exported (mmseg: the segmentor in ``mode='tensor'``, through
``torch.onnx.export``'s dynamo exporter; detectron2: its own ``TracingAdapter`` path, through the
TorchScript exporter as detectron2's ``export_model.py`` does); this module writes the files
(:func:`export_onnx`: one self-contained ``.onnx`` file, or ``NAME.onnx.data`` beside it above protobuf's
2 GB, named after the output and moved into place together), runs them in ONNX Runtime from a folder of
their own before they are moved, and compares every output with PyTorch's (:func:`compare_onnx_outputs`,
or the adapter's own check).
``onnx`` and ``onnxruntime`` (and ``onnxscript`` for the dynamo exporter) are the ``export`` extra.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["export_onnx", "export_aligned", "save_onnx", "onnx_data_path", "PROTOBUF_LIMIT", "compare_onnx_outputs",
           "run_onnx", "ort_session", "ort_runner"]

logger = logging.getLogger(__name__)


def _need(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs {module!r}: pip install 'lrpet-dense[export]' (onnx, onnxruntime, "
                          "onnxscript)") from e


#: The largest ONNX file protobuf can write (2 GB): a model above it keeps its weights in ``NAME.onnx.data``.
PROTOBUF_LIMIT = 2 ** 31 - 1


def onnx_data_path(path: str) -> str:
    """The external-data file of the ONNX file ``path`` (``NAME.onnx.data`` beside it), used only above
    :data:`PROTOBUF_LIMIT`."""
    return path + ".data"


def save_onnx(model: Any, path: str) -> List[str]:
    """Write an in-memory ONNX ``model`` (weights loaded) to ``path``, self-contained where protobuf allows.

    Up to :data:`PROTOBUF_LIMIT` one file; above it the weights go to one file beside it,
    :func:`onnx_data_path` (referenced by its name only, so the two files can be moved together). A
    data file of an earlier save is replaced, never appended to. The written files get the mode the
    umask gives a new file, and ``onnx.checker`` checks them from ``path``.

    Returns:
        The files written: ``[path]`` or ``[path, path + ".data"]``.
    """
    onnx = _need("onnx")
    data = onnx_data_path(path)
    if os.path.lexists(data):
        os.unlink(data)
    try:
        size = model.ByteSize()
    except Exception:  # noqa: BLE001 (protobuf may refuse to size a message above its limit)
        size = PROTOBUF_LIMIT + 1
    external = size > PROTOBUF_LIMIT
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(data), size_threshold=1024)
        # onnx's C++ writer creates the data file 0600; give it the mode Python gave the .onnx file (umask)
        os.chmod(data, stat.S_IMODE(os.stat(path).st_mode))
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(path)
    return [path, data] if external else [path]


def export_onnx(module: torch.nn.Module, args: Tuple[torch.Tensor, ...], path: str, *, dynamo: bool,
                opset: int = 17, input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None,
                check: Optional[Callable[[str], Dict[str, float]]] = None) -> Dict[str, Any]:
    """``torch.onnx.export`` of ``module(*args)`` to ``path``, checked before it is moved into place.

    The exporter writes into a fresh hidden folder beside ``path``; its output is rewritten as the
    files that will be kept, named after ``path`` (:func:`save_onnx`: one self-contained file, or
    ``NAME.onnx.data`` beside it above protobuf's 2 GB), alone in a folder of their own. There they are
    checked by ``onnx.checker`` and by ``check`` (e.g. :func:`compare_onnx_outputs` of ONNX Runtime's
    outputs against PyTorch's), so a file that runs there runs wherever the files are moved together.
    Only then are they moved to ``path`` (a ``NAME.onnx.data`` left by an earlier export of ``path``
    is removed when the new file is self-contained). Nothing else is left behind, on success or
    failure: a file that fails a check is never written to ``path``.

    Returns:
        ``{"check": what check returns ({} without one), "files": the files written, path first}``.

    Raises:
        ValueError: ``path`` is a folder, or a check failed.
    """
    onnx = _need("onnx")
    if dynamo:
        _need("onnxscript")
    if os.path.isdir(path):
        raise ValueError(f"ONNX output {path!r} is a folder; give the .onnx file to write")
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder)
    try:
        raw, staged = os.path.join(work, "export"), os.path.join(work, "out")
        os.mkdir(raw)
        os.mkdir(staged)
        module.eval()
        with torch.no_grad():
            torch.onnx.export(module, args, os.path.join(raw, name), opset_version=opset, dynamo=dynamo,
                              input_names=input_names, output_names=output_names)
        module.eval()  # the TorchScript exporter restores the modes it found: keep inference mode
        model = onnx.load(os.path.join(raw, name))  # with its weights, wherever the exporter put them
        shutil.rmtree(raw)
        target = os.path.join(staged, name)
        save_onnx(model, target)
        del model
        result = check(target) if check is not None else {}
        files = sorted(os.listdir(staged))
        expected = {name, os.path.basename(onnx_data_path(name))}
        if name not in files or not set(files) <= expected:
            raise ValueError(f"ONNX export of {path!r} produced {files}; expected {sorted(expected)}")
        final = [os.path.join(folder, f) for f in files]
        stale = onnx_data_path(os.path.join(folder, name))
        for f in sorted(files, key=lambda f: f == name):  # the weights first, the graph that names them last
            os.replace(os.path.join(staged, f), os.path.join(folder, f))
        if stale not in final and os.path.lexists(stale):
            os.unlink(stale)
            logger.info("removed %s: the weights of an earlier export of %s, which is now self-contained", stale, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    final.sort(key=lambda f: f != os.path.join(folder, name))
    shown = os.path.dirname(path)
    return {"check": result, "files": [os.path.join(shown, os.path.basename(f)) for f in final]}


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
        ``{"reference": [PyTorch outputs, internal ones left out], "check": {...}, "aligned": [padded conv names],
        "files": the files written (``path``, and ``NAME.onnx.data`` for a model above 2 GB)}``.
    """
    from .deploy import aligned_for_export

    with torch.no_grad():
        out = wrap(model).eval()(*args)
    reference = list(out) if isinstance(out, (tuple, list)) else [out]
    if not 0 <= internal_outputs < len(reference):
        raise ValueError(f"internal_outputs={internal_outputs}: the module returns {len(reference)} outputs")
    exported, aligned = aligned_for_export(model, align_ranks)
    module = wrap(exported).eval()

    def check(f: str) -> Dict[str, float]:  # f: the file to keep, named as path, alone in a fresh folder
        outs = run_onnx(f, args)
        result = compare(module, outs, reference) if compare is not None else compare_onnx_outputs(outs, reference,
                                                                                                  path)
        if internal_outputs:
            _drop_last_outputs(f, internal_outputs)
            _same_outputs(path, run_onnx(f, args), outs[:len(outs) - internal_outputs])
        return result

    written = export_onnx(module, args, path, dynamo=dynamo, opset=opset, input_names=input_names,
                          output_names=output_names, check=check)
    return {"reference": reference[:len(reference) - internal_outputs], "check": written["check"], "aligned": aligned,
            "files": written["files"]}


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
    save_onnx(model, path)  # checked from the file (onnx.checker cannot check a model above 2 GB in memory)


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
