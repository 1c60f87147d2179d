"""Checkpoint file helpers shared by both adapters (torch only)."""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["atomic_save", "load_checkpoint_safe"]


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the target folder, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
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


def load_checkpoint_safe(path: str) -> Any:
    """``torch.load(path, weights_only=True, map_location='cpu')`` with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with arbitrary objects, ...
        raise ValueError(f"cannot load checkpoint {path!r} safely (weights_only=True): {e}") from e
