"""What every OpenMMLab task (mmseg, mmdet) supplies to LRPET alike: :class:`OpenMMLabAdapter`.

mmseg and mmdet run on the same mmengine runner, keep their norms the same way and write the same
checkpoints, so their adapters share (on the contract :class:`lrpet_dense.core.adapter.Adapter`):

- unwrapping mmengine's model wrappers, the norm lookup and the default selection (``backbone.*``)
  (:mod:`lrpet_dense.openmmlab.pairing`);
- the checkpoint layout: mmengine's ``{"meta", "state_dict", ...}`` with the hook's state under
  ``"lrpet"``; compressed: ``{"meta": {..., "lrpet_plan", "lrpet_model_type"}, "state_dict"}``, whose
  state dict starts with a note (:data:`NOTE_KEY_FORMAT`) that mmengine's loader prints first among
  the unexpected keys when a model built without lrpet_dense gets the checkpoint;
- :meth:`OpenMMLabAdapter.load_model` (the task's ``init_model`` / ``init_detector``, then a strict load).

A task adapter supplies the rest: :meth:`~OpenMMLabAdapter.model_bases` (which models it serves),
:meth:`~OpenMMLabAdapter.lrpet_type_name`, :meth:`~OpenMMLabAdapter.init_model`, and the contract's
plan forward, output tensors, counter and export. Importing a task package registers its adapter
(:func:`register_adapter`); the shared ``LRPETHook`` finds the one serving the runner's model
(:func:`adapter_for`).
"""
from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from lrpet_dense.core.adapter import Adapter
from lrpet_dense.core.factorize import NOTE_STATE_PREFIX, PLAN_METADATA_KEY

from .pairing import default_include, find_norm, unwrap_model

__all__ = ["OpenMMLabAdapter", "register_adapter", "adapter_for", "registered_adapters", "CHECKPOINT_KEY",
           "PLAN_KEY", "MODEL_TYPE_KEY", "NOTE_KEY_FORMAT", "compressed_note"]

logger = logging.getLogger(__name__)

#: Key of the LRPET hook's state (plan and projection counters) in training checkpoints.
CHECKPOINT_KEY = "lrpet"
#: Key of the plan in a compressed checkpoint's ``meta`` and in the root's state-dict metadata.
PLAN_KEY = PLAN_METADATA_KEY
#: Key of the LRPET model type to build a compressed checkpoint with, in its ``meta``.
MODEL_TYPE_KEY = "lrpet_model_type"
#: The first key of a compressed checkpoint's state dict: a message, not a weight. mmengine's loader
#: prints it first among the "unexpected key in source state_dict" when a model built without
#: lrpet_dense (a stock type in a process that never imported it) gets the checkpoint; the loading
#: pre-hook of the LRPET model types drops it. Its value is the same message as UTF-8 bytes.
NOTE_KEY_FORMAT = (NOTE_STATE_PREFIX + ": LRPET COMPRESSED CHECKPOINT - build the model with type={type!r} "
                   "(custom_imports={package!r}); this model was built without lrpet_dense and got NO weights "
                   "for its factorised convs")


def compressed_note(model_type: str, package: str) -> Tuple[str, torch.Tensor]:
    """The note entry ``(key, uint8 tensor)`` of a compressed checkpoint's state dict (:data:`NOTE_KEY_FORMAT`)."""
    key = NOTE_KEY_FORMAT.format(type=model_type, package=package)
    return key, torch.tensor(list(key.encode("utf-8")), dtype=torch.uint8)


class OpenMMLabAdapter(Adapter):
    """The mmengine-level part of the mmseg and mmdet adapters (see the module docs)."""

    checkpoint_key = "state_dict"
    #: the task's package, whose import registers the hook, the model types and the adapter
    package: str = ""

    # -- supplied by the task -----------------------------------------------------------------------
    def model_bases(self) -> Tuple[type, ...]:
        """Supplied: the task's model base classes (e.g. ``BaseSegmentor``): the models this adapter serves."""
        raise NotImplementedError

    def lrpet_type_name(self, model: nn.Module) -> str:
        """Supplied: the registered LRPET model type that loads ``model``'s compressed checkpoints."""
        raise NotImplementedError

    def init_model(self, cfg: Any, device: str) -> nn.Module:
        """Supplied: the task's own model builder (``init_model`` / ``init_detector``) without a checkpoint."""
        raise NotImplementedError

    # -- shared by the OpenMMLab tasks --------------------------------------------------------------
    def accepts(self, model: nn.Module) -> bool:
        """Whether this adapter serves ``model`` (wrapped or not)."""
        return isinstance(self.unwrap(model), self.model_bases())

    def unwrap(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model)

    def find_norm(self, name, conv, parent, child):
        return find_norm(name, conv, parent, child)

    def default_include(self, model):
        return default_include(model)

    def training_state(self, checkpoint: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
        return checkpoint.get(CHECKPOINT_KEY)

    def compressed_checkpoint(self, state, plan, factorized, meta) -> Dict[str, Any]:
        """mmengine's layout: ``{"meta": {..., "lrpet_plan": plan}, "state_dict": state dict}``, the state
        dict headed by the note (:data:`NOTE_KEY_FORMAT`) naming ``meta["lrpet_model_type"]``."""
        meta = dict(meta)
        meta[PLAN_KEY] = plan.to_dict()
        key, value = compressed_note(meta.get(MODEL_TYPE_KEY) or "LRPET...", self.package)
        noted = OrderedDict([(key, value)])
        noted.update(state)
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            noted._metadata = metadata  # type: ignore[attr-defined]
        return {"meta": meta, "state_dict": noted}

    def save_compressed(self, model: nn.Module, path: str, meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """As :meth:`Adapter.save_compressed`; ``meta`` also names the LRPET model type that loads it."""
        meta = dict(meta or {})
        meta.setdefault(MODEL_TYPE_KEY, self.lrpet_type_name(self.unwrap(model)))
        return super().save_compressed(model, path, meta)

    def load_model(self, cfg: Any, path: Optional[str] = None, *, device: Optional[str] = None,
                   dense_only: bool = False) -> Tuple[nn.Module, dict]:
        """Build ``cfg``'s model (any model type) as the task's own API does and load a dense or compressed
        checkpoint strictly.

        Unlike the task's ``init_model`` / ``init_detector``, the checkpoint is read with
        ``torch.load(weights_only=True)`` (errors name the file and any offending class), a compressed
        one first builds its factorised convs, and any missing or unexpected key is an error
        (mmengine only warns).

        Args:
            cfg: an mmengine ``Config`` (not modified).
            path: the checkpoint, or None for a freshly initialised model.
            device: where the model goes. Defaults to None: CPU (the configs name no device).
            dense_only: refuse a compressed checkpoint. Defaults to False.

        Returns:
            ``(model, checkpoint)``: the model in eval mode, and the checkpoint dict (``{}`` without one).
        """
        from lrpet_dense.io import load_checkpoint_safe

        device = device or "cpu"
        ckpt: Dict[str, Any] = {}
        if path is not None:
            ckpt = load_checkpoint_safe(path)
            if dense_only and self.is_compressed(ckpt):
                raise ValueError(f"checkpoint {path!r} is already compressed (factorised); give the dense training "
                                 "checkpoint it was made from (e.g. iter_N.pth, epoch_N.pth)")
        model = self.init_model(copy.deepcopy(cfg), device)
        if path is not None:
            self.load_state_(model, ckpt, path)
            meta = ckpt.get("meta") or {}
            if meta.get("dataset_meta"):
                model.dataset_meta = meta["dataset_meta"]
        return model.to(device).eval(), ckpt


_ADAPTERS: List[OpenMMLabAdapter] = []


def register_adapter(adapter: OpenMMLabAdapter) -> OpenMMLabAdapter:
    """Make ``adapter`` known to the shared hook (a task package does it on import). Idempotent."""
    if not isinstance(adapter, OpenMMLabAdapter):
        raise TypeError(f"register_adapter takes an OpenMMLabAdapter, got {type(adapter).__name__}")
    if all(a is not adapter for a in _ADAPTERS):
        _ADAPTERS.append(adapter)
    return adapter


def registered_adapters() -> List[OpenMMLabAdapter]:
    """The task adapters imported so far."""
    return list(_ADAPTERS)


def adapter_for(model: nn.Module) -> OpenMMLabAdapter:
    """The registered task adapter that serves ``model``.

    Raises:
        ValueError: no imported task package serves the model's type; the message names the type and
            the packages to import (``custom_imports``).
    """
    for adapter in _ADAPTERS:
        if adapter.accepts(model):
            return adapter
    model = unwrap_model(model)
    known = ", ".join(repr(a.package) for a in _ADAPTERS) or "none"
    raise ValueError(f"LRPETHook: no LRPET adapter serves a {type(model).__module__}.{type(model).__name__} model "
                     f"(imported: {known}). Import the package of its task in the config: custom_imports="
                     "dict(imports=['lrpet_dense.mmseg']) for mmseg segmentors, ['lrpet_dense.mmdet'] for mmdet "
                     "detectors")
