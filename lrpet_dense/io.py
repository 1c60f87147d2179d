"""Checkpoint file helpers shared by both adapters (torch only)."""
from __future__ import annotations

import os
import pickle
import re
import secrets
import zipfile
from typing import Any, Mapping, Tuple

import torch

__all__ = ["atomic_save", "load_checkpoint_safe", "check_checkpoint_file", "check_finite_state", "allow_numpy_globals",
           "plain_data"]


def _new_temp_file(folder: str, suffix: str) -> Tuple[int, str]:
    """A new hidden file in ``folder``, opened for writing, with the mode the umask gives a new file
    (``tempfile.mkstemp`` makes it 0600, which the rename would keep)."""
    for _ in range(100):
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder!r}")


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the target folder, then rename: never a half-written file (its mode
    is the umask's, as for any new file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _new_temp_file(folder, ".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_checkpoint_file(path: str) -> None:
    """Cheap checks that ``path`` is a complete checkpoint file, before anything is built or loaded.

    A missing or empty file, or a ``.pth``/``.pt`` file that is not a complete zip archive (what
    ``torch.save`` writes; a truncated copy has no central directory), is an error naming the file.
    Other files (e.g. detectron2's ``.pkl`` model-zoo weights) are only checked to exist.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty or truncated.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; check the path (for a training run, the "
                                "checkpoints are in its output/work folder)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path!r} is empty (an interrupted copy or save?); use a complete checkpoint")
    if path.endswith((".pth", ".pt")) and not zipfile.is_zipfile(path):
        raise ValueError(f"checkpoint {path!r} is truncated or not a torch checkpoint (no complete zip archive, "
                         "as torch.save writes); copy it again or use an earlier checkpoint")


def check_finite_state(state: Mapping[str, Any], path: str = "the checkpoint") -> None:
    """Raise when a floating-point tensor of a state dict holds NaN/Inf (e.g. a diverged run).

    Raises:
        ValueError: names the first such entry and how many values are bad.
    """
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{path}: {key!r} has {bad} NaN/Inf value(s) (training diverged?); refusing to use it. "
                             "Use an earlier checkpoint, or retrain with a lower learning rate / gradient clipping")


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|unrecognized function ([\w.<> ]+)|got <class '([\w.]+)'>")


def load_checkpoint_safe(path: str) -> Any:
    """``torch.load(path, weights_only=True, map_location='cpu')`` with one-line errors that name the file.

    A checkpoint holding an object that is neither plain data nor allow-listed (see
    :func:`allow_numpy_globals`; ``lrpet_dense.mmseg`` also allow-lists mmengine's ``HistoryBuffer``) is
    refused, naming its class: its code is never run.
    """
    check_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = _UNSAFE_GLOBAL.search(str(e))
        what = next((g for g in m.groups() if g), None) if m else None
        reason = f"it needs {what}" if what else f"{str(e).splitlines()[0]}"
        raise ValueError(f"cannot load checkpoint {path!r} safely (weights_only=True): {reason}, which is neither "
                         "plain data (tensors, numbers, strings, lists, dicts) nor allow-listed; lrpet_dense never "
                         "runs code from a checkpoint. Re-save it without that object") from e
    except Exception as e:  # truncated file, ...
        raise ValueError(f"cannot load checkpoint {path!r} safely (weights_only=True): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def allow_numpy_globals() -> None:
    """Allow-list numpy arrays, scalars and dtypes for ``torch.load(weights_only=True)``. Idempotent.

    What numpy pickles them with: ``numpy._core.multiarray._reconstruct`` and ``ndarray`` (arrays),
    ``numpy._core.multiarray.scalar`` (scalars), ``numpy.dtype`` and its per-type classes; numpy 1.x
    names them ``numpy.core.multiarray.*``. None of them runs code beyond building the array; an
    object array's elements go through the same restricted unpickler. These are the globals that
    PyTorch's own documentation lists for numpy data in ``weights_only`` checkpoints.
    """
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = [type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"]
    torch.serialization.add_safe_globals([
        multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtypes,
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
    ])


def plain_data(value: Any) -> Any:
    """``value`` reduced to what ``torch.load(weights_only=True)`` reads without any allow-list (for
    metadata: dicts, lists, numbers, strings, tensors; numpy values become lists/numbers, the rest str)."""
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "tolist"):  # numpy scalars/arrays
        return value.tolist()
    return str(value)
