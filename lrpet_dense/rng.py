"""The states of the random number generators a training process uses, as plain data (torch + numpy).

A resumed run replays an uninterrupted one exactly only if every random draw after the checkpoint
is the same: detectron2's RPN/ROI samplers permute candidates with the global torch RNG, data
augmentation draws from numpy, some code from Python's ``random``. :func:`capture_rng_state`
returns those states as plain data (a uint8 tensor, lists and numbers), so a checkpoint holding
them still loads with ``torch.load(..., weights_only=True)``; :func:`restore_rng_state` puts them
back.

Example:
    >>> import torch
    >>> from lrpet_dense.rng import capture_rng_state, restore_rng_state
    >>> state = capture_rng_state()
    >>> a = torch.rand(3)
    >>> restore_rng_state(state)
    >>> torch.equal(a, torch.rand(3))
    True
"""
from __future__ import annotations

import contextlib
import logging
import random
from typing import Any, Dict, Iterator

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "preserved_rng_state"]

logger = logging.getLogger(__name__)


def capture_rng_state() -> Dict[str, Any]:
    """The global torch (CPU and, when initialised, CUDA), numpy and Python RNG states, as plain data.

    Returns:
        ``{"torch": uint8 tensor, "numpy": {...}, "python": {...}}`` plus ``"cuda"`` (a list of
        uint8 tensors, one per visible device) when CUDA has been initialised.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Set the global RNGs to a state from :func:`capture_rng_state` (also after ``torch.load``).

    A ``"cuda"`` entry is restored when this process sees the same number of CUDA devices;
    otherwise it is skipped with a warning (the CPU streams are still restored).

    Raises:
        ValueError: ``state`` is not a state written by :func:`capture_rng_state`.
    """
    try:
        torch_state = state["torch"]
        np_state = state["numpy"]
        py_state = state["python"]
        numpy_tuple = (np_state["kind"], np.asarray(np_state["keys"], dtype=np.uint32), int(np_state["pos"]),
                       int(np_state["has_gauss"]), float(np_state["cached_gaussian"]))
        python_tuple = (int(py_state["version"]), tuple(int(v) for v in py_state["internal"]), py_state["gauss_next"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"not an RNG state written by lrpet_dense.rng.capture_rng_state: missing/invalid {e!r}") from e
    torch.set_rng_state(torch_state.to(device="cpu", dtype=torch.uint8))
    np.random.set_state(numpy_tuple)
    random.setstate(python_tuple)
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning("saved CUDA RNG states are for %d device(s), this process sees %d: CUDA RNG not restored",
                           len(cuda), torch.cuda.device_count())


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run the ``with`` body without it moving the global RNG streams (they are restored afterwards).

    Used around evaluation during training, so that whether (and how often) a run evaluates does
    not change the random draws of its training steps.
    """
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
