"""The adapter contract: what a training framework supplies, and everything written once against it.

An :class:`Adapter` subclass (``lrpet_dense.detectron2``, ``lrpet_dense.mmseg``, and the plain PyTorch
one of :mod:`lrpet_dense.core.plain`) supplies what truly differs between frameworks:

- **norm lookup** (:meth:`Adapter.find_norm`): which norm follows a conv (detectron2 ``conv.norm``,
  mmseg sibling ``bnN`` / ``Sequential`` / ``ConvModule``, plain PyTorch the recorded forward);
- **default layer selection** (:meth:`Adapter.default_include`);
- **the plan's forward** (:meth:`Adapter.default_input_hw`, :meth:`Adapter.plan_forwards`): the input
  size and the forward that measures conv output sizes, and which convs the MAC cut is a fraction of;
- **output tensors** (:meth:`Adapter.check_inputs`, :meth:`Adapter.output_tensors`): the model's
  outputs before any discrete step, compared in float64 after every model surgery;
- **checkpoint layout** (:attr:`Adapter.checkpoint_key`, :meth:`Adapter.training_state`,
  :meth:`Adapter.compressed_checkpoint`);
- **export wrapper** (:meth:`Adapter.export_onnx`) and the framework's counter
  (:meth:`Adapter.count_complexity`);
- the **trial runner** (:attr:`Adapter.trial_runner`, a :class:`lrpet_dense.search.TrialRunner`) and
  the **measurer** (:attr:`Adapter.measurer`, a :class:`lrpet_dense.report.RunMeasurer`).

Written once here: selection and pairing (:meth:`Adapter.pair_convs`), planning
(:meth:`Adapter.build_plan`), the training session (:meth:`Adapter.session`), checked compression
(:meth:`Adapter.compress_model_`), the inference form (:meth:`Adapter.to_inference_`), compressed
checkpoints (:meth:`Adapter.save_compressed`, :meth:`Adapter.plan_from_checkpoint`,
:meth:`Adapter.is_compressed`, :meth:`Adapter.load_state_`). The adapter packages export these as
module functions of the same names, so the frameworks cannot drift apart.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import LRPETConfig
from .factorize import (PLAN_METADATA_KEY, FactorizedConv2d, compressed_state_dict, model_plan, plan_in_state_dict)
from .projection import ConvBN
from .rank import RankPlan
from .selection import FilterFn, Pairing, output_sizes, pair_with, plan_layers
from .session import FACTORIZED_MODEL_ERROR, LRPETSession

__all__ = ["Adapter", "PlanForwards", "CHECK_HW", "summarize_names", "summarize_load_error"]

logger = logging.getLogger(__name__)

#: Input size of the float64 output checks of compression and the inference form (both adapters).
CHECK_HW: Tuple[int, int] = (64, 64)


class PlanForwards(NamedTuple):
    """The forwards that measure conv output sizes for a plan.

    Attributes:
        run: one forward over the convs the MAC cut refers to (e.g. the backbone).
        reference_names: those convs' names: the cut is a fraction of their MACs.
        whole: a forward of the whole model, for selected convs that ``run`` does not reach; None:
            such convs get the ratio but no output size (and do not count towards the cut).
    """

    run: Callable[[], Any]
    reference_names: List[str]
    whole: Optional[Callable[[], Any]] = None


def _hw(size: Any, what: str) -> Tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"{what} must be (H, W) of positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def summarize_names(names: Sequence[str], shown: int = 3) -> str:
    """``names`` for an error message: all of them when few, else the count and the first ``shown``."""
    names = list(names)
    if len(names) <= shown + 1:
        return ", ".join(repr(n) for n in names) or "nothing"
    return f"{len(names)}: " + ", ".join(repr(n) for n in names[:shown]) + ", ..."


def summarize_load_error(message: str, model_keys: int, shared_keys: Optional[int] = None, shown: int = 3) -> str:
    """torch's ``load_state_dict`` error (every missing and unexpected key listed) summarised: counts and the
    first ``shown`` names of each kind; a checkpoint that shares no key with the model (``shared_keys == 0``)
    is called one of another model."""
    missing: List[str] = []
    unexpected: List[str] = []
    shapes: List[str] = []
    other: List[str] = []
    for line in message.split("\n\t")[1:] if "\n\t" in message else [message]:
        line = line.strip()
        if line.startswith("Missing key(s) in state_dict:"):
            missing += re.findall(r'"([^"]+)"', line)
        elif line.startswith("Unexpected key(s) in state_dict:"):
            unexpected += re.findall(r'"([^"]+)"', line)
        elif line.startswith("size mismatch for "):
            m = re.match(r"size mismatch for (.+?): copying a param with shape (.+?) from checkpoint, "
                         r"the shape in current model is (.+?)\.?$", line)
            shapes.append(f"{m.group(1)!r} {m.group(2)} in the checkpoint, {m.group(3)} in the model" if m else line)
        elif line:
            other.append(line if len(line) <= 300 else line[:300] + " ...")
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {model_keys} keys are missing from it "
                     f"({', '.join(map(repr, missing[:shown]))}{', ...' if len(missing) > shown else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its keys are not in the model "
                     f"({', '.join(map(repr, unexpected[:shown]))}{', ...' if len(unexpected) > shown else ''})")
    if shapes:
        parts.append(f"{len(shapes)} keys have another shape ({'; '.join(shapes[:shown])}"
                     f"{'; ...' if len(shapes) > shown else ''})")
    parts += other[:shown]
    text = "; ".join(parts) if parts else message.strip()[:500]
    if shared_keys == 0:
        text += ". It shares no key with the model: a checkpoint of another model or framework (e.g. a detectron2 " \
                "checkpoint given to an mmseg command, or the other way round)?"
    return text


class Adapter:
    """What a framework supplies to LRPET (see the module docs); the rest is written once here.

    Subclasses implement the methods marked "supplied"; the others are the shared implementation.
    """

    #: the framework's name (``"detectron2"``, ``"mmseg"``, ``"torch"``)
    name: str = ""
    #: where a checkpoint keeps the model's state dict (``"model"``: detectron2 / plain; ``"state_dict"``: mmengine)
    checkpoint_key: str = "model"
    #: the framework's ``nn.Conv2d`` subclasses whose forward is ``nn.Conv2d``'s once their norm is folded
    conv_types: Tuple[type, ...] = ()
    #: the framework's :class:`lrpet_dense.search.TrialRunner` (LRPET-S trials), or None
    trial_runner: Optional[type] = None
    #: the framework's :class:`lrpet_dense.report.RunMeasurer` (the report), or None
    measurer: Optional[type] = None

    # -- supplied by the framework ------------------------------------------------------------------
    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model inside a data-parallel wrapper (supplied; default: torch's DDP / DataParallel)."""
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        return model

    def find_norm(self, name: str, conv: nn.Conv2d, parent: nn.Module,
                  child: str) -> Tuple[Optional[nn.Module], Optional[str]]:
        """Supplied: the norm that follows ``conv`` (any type, or None) and a note worth a warning (or None)."""
        raise NotImplementedError

    def default_include(self, model: nn.Module) -> List[str]:
        """Supplied: the fnmatch patterns of the default selection (e.g. ``["backbone.*"]``)."""
        raise NotImplementedError

    def default_input_hw(self, model: nn.Module, cfg: Any = None) -> Tuple[int, int]:
        """Supplied: the default ``(H, W)`` of the plan's forward, the MAC count and latency (the
        framework's test or crop size, from ``cfg`` where the model does not carry it)."""
        raise NotImplementedError

    def plan_forwards(self, model: nn.Module, input_hw: Tuple[int, int]) -> PlanForwards:
        """Supplied: the forwards on a ``(H, W)`` input that measure conv output sizes (:class:`PlanForwards`)."""
        raise NotImplementedError

    def check_inputs(self, model: nn.Module, input_hw: Tuple[int, int]) -> Any:
        """Supplied: a fixed float64 input of ``(H, W)`` for :meth:`output_tensors` (CPU)."""
        raise NotImplementedError

    def output_tensors(self, model: nn.Module, inputs: Any) -> Any:
        """Supplied: the model's tensors before any discrete step (a nested structure), for ``inputs``."""
        raise NotImplementedError

    def training_state(self, checkpoint: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
        """Supplied: the LRPET hook's state (``{"plan", "projector"}``) in a training checkpoint, or None."""
        return None

    def compressed_checkpoint(self, state: Mapping[str, Any], plan: RankPlan, factorized: List[str],
                              meta: Dict[str, Any]) -> Dict[str, Any]:
        """Supplied (default: detectron2's layout): the compressed checkpoint dict.

        ``{"model": state dict (+ "_lrpet_plan"), "lrpet_plan": plan, "lrpet_factorized": names, "meta": meta}``.
        """
        return {self.checkpoint_key: state, "lrpet_plan": plan.to_dict(), "lrpet_factorized": factorized,
                "meta": meta}

    def count_complexity(self, model: nn.Module, input_hw: Tuple[int, int]) -> Dict[str, Dict[str, int]]:
        """Supplied: ``{"backbone": {"params", "macs"}, "model": {...}}`` by the framework's own counter."""
        raise NotImplementedError

    def export_onnx(self, model: nn.Module, path: str, input_hw: Tuple[int, int], *,
                    align_ranks: int = 16) -> Dict[str, Any]:
        """Supplied: export through the framework's path and check the file in ONNX Runtime."""
        raise NotImplementedError

    # -- written once -------------------------------------------------------------------------------
    def pair_convs(self, model: nn.Module, config: Optional[LRPETConfig] = None, filter_fn: Optional[FilterFn] = None,
                   *, factorized: bool = False) -> Pairing:
        """The convs ``config`` selects (``include`` empty: :meth:`default_include`), each with the BatchNorm
        after it; ``filter_fn(conv, name)`` may narrow the selection. The rules and errors are
        :func:`lrpet_dense.core.selection.select_convs`'s. With ``factorized``, a factorised conv counts
        as one conv (to fold its BatchNorm for inference)."""
        return pair_with(self.unwrap(model), config, filter_fn, self.default_include, self.find_norm, factorized)

    def build_plan(self, model: nn.Module, layers: Sequence[ConvBN], config: LRPETConfig,
                   input_hw: Optional[Tuple[int, int]] = None) -> RankPlan:
        """The rank plan of ``layers`` (a ratio, a MAC cut solved by the core, an energy or latency plan).

        Output sizes come from :meth:`plan_forwards` at ``config.plan_input_size`` (else ``input_hw``,
        else :meth:`default_input_hw`), in eval mode (BN statistics untouched). The MAC cut is a fraction
        of the reference convs' MACs (e.g. the whole backbone's, frozen and unselected convs included).
        Selected convs whose factorised form would not save MACs are left out of the plan (not
        projected), unless named exactly in ``include`` or ``overrides``.
        """
        model = self.unwrap(model)
        hw = _hw(config.plan_input_size or input_hw or self.default_input_hw(model), "the planning input size")
        forwards = self.plan_forwards(model, hw)
        in_sizes: Dict[str, Tuple[int, int]] = {}
        sizes = output_sizes(model, forwards.reference_names, forwards.run, in_sizes)
        others = [l.name for l in layers if l.name not in sizes]
        if others and forwards.whole is not None:
            sizes.update(output_sizes(model, others, forwards.whole, in_sizes))
        return plan_layers(model, layers, config, sizes, forwards.reference_names, in_sizes)

    def session(self, model: nn.Module, config: LRPETConfig, *, filter_fn: Optional[FilterFn] = None,
                input_hw: Optional[Tuple[int, int]] = None, total_steps: Optional[int] = None,
                log: Optional[logging.Logger] = None) -> LRPETSession:
        """An :class:`~lrpet_dense.core.LRPETSession` for training ``model``: select and pair the convs,
        log the selection, plan (:meth:`build_plan`). A factorised model is refused before anything else."""
        model = self.unwrap(model)
        if model_plan(model) is not None:
            raise ValueError(FACTORIZED_MODEL_ERROR)
        pairing = self.pair_convs(model, config, filter_fn)
        pairing.log(log or logger)
        plan = self.build_plan(model, pairing.layers, config, input_hw)
        return LRPETSession(model, pairing.layers, plan, config, total_steps=total_steps, log=log)

    def _check_inputs(self, model: nn.Module, check_hw: Optional[Tuple[int, int]]) -> Any:
        return self.check_inputs(model, _hw(check_hw or CHECK_HW, "check_hw"))

    def compress_model_(self, model: nn.Module, plan: RankPlan, *, project: bool = False,
                        config: Optional[LRPETConfig] = None, check_hw: Optional[Tuple[int, int]] = None,
                        rtol: float = 1e-4) -> List[str]:
        """Factorise the planned convs of a trained, projected model in place, once checked.

        Every planned conv must already be of its planned rank (with ``project``, it is first projected
        onto it: a one-shot truncation with ``config``'s projection options); the factorised model's
        :meth:`output_tensors` on one fixed ``check_hw`` input (default :data:`CHECK_HW`) must equal the
        dense model's in float64 within ``rtol`` of each output's scale; otherwise the model is not
        factorised (:func:`lrpet_dense.core.verify.factorize_checked_`). Returns the factorised convs' names.
        """
        from .verify import factorize_checked_

        model = self.unwrap(model)
        layers = None
        if project:
            layers = self.pair_convs(model, LRPETConfig(include=tuple(plan.layers), include_frozen=True)).layers
        inputs = self._check_inputs(model, check_hw)
        return factorize_checked_(model, plan, lambda m: self.output_tensors(m, inputs), project_layers=layers,
                                  config=config, rtol=rtol, what=f"the factorised {self.name} model")

    def to_inference_(self, model: nn.Module, *, check_hw: Optional[Tuple[int, int]] = None,
                      rtol: float = 1e-4) -> nn.Module:
        """The deploy path's inference form, in place: every BatchNorm after a conv (dense or factorised)
        folded into it and ``channels_last`` weights on CPU (:mod:`lrpet_dense.core.deploy`).

        The folding is checked first on a copy: the :meth:`output_tensors` must equal the model's as it
        was, in float64; otherwise nothing changes. Inference only. Returns ``model`` (unwrapped), in eval mode.
        """
        from .deploy import EVERY_CONV, to_inference_checked_

        model = self.unwrap(model).eval()
        inputs = self._check_inputs(model, check_hw)
        return to_inference_checked_(model, lambda m: self.pair_convs(m, EVERY_CONV, factorized=True).layers,
                                     lambda m: self.output_tensors(m, inputs), conv_types=self.conv_types, rtol=rtol,
                                     what=f"the {self.name} model with its BatchNorms folded")

    def save_compressed(self, model: nn.Module, path: str, meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Write a factorised ``model`` as a compressed checkpoint, atomically (plain data and tensors only).

        The plan travels three ways: the state dict's ``_lrpet_plan`` tensor and root metadata, and the
        checkpoint's own entry (:meth:`compressed_checkpoint`). Returns the saved checkpoint dict.

        Raises:
            ValueError: the model is not factorised.
        """
        from lrpet_dense.io import atomic_save, plain_data

        model = self.unwrap(model)
        plan = model_plan(model)
        if plan is None:
            raise ValueError("the model is not factorised: call compress_model_ first")
        factorized = sorted(n for n, m in model.named_modules() if isinstance(m, FactorizedConv2d))
        ckpt = self.compressed_checkpoint(compressed_state_dict(model), plan, factorized, plain_data(dict(meta or {})))
        atomic_save(ckpt, path)
        logger.info("wrote compressed checkpoint %s (%d factorised convs)", path, len(factorized))
        return ckpt

    def _state(self, checkpoint: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
        state = checkpoint.get(self.checkpoint_key)
        return state if isinstance(state, Mapping) else None

    def plan_from_checkpoint(self, checkpoint: Mapping[str, Any]) -> Optional[RankPlan]:
        """The rank plan a checkpoint dict carries, or None.

        In this order: the plan of the weights themselves (the state dict's ``_lrpet_plan`` tensor or
        root metadata: a compressed model's structure), the compressed checkpoint's own entry
        (``lrpet_plan``, or ``meta['lrpet_plan']``), then a training checkpoint's LRPET hook state
        (:meth:`training_state`).
        """
        state = self._state(checkpoint)
        if state is not None:
            plan = plan_in_state_dict(state)
            if plan is not None:
                return plan
        for data in (checkpoint.get("lrpet_plan"), (checkpoint.get("meta") or {}).get(PLAN_METADATA_KEY)):
            if data is not None:
                return RankPlan.from_dict(data)
        hook = self.training_state(checkpoint)
        if hook and hook.get("plan") is not None:
            return RankPlan.from_dict(hook["plan"])
        return None

    def is_compressed(self, checkpoint: Mapping[str, Any]) -> bool:
        """Whether a checkpoint dict holds a factorised model (not a training checkpoint that has a plan)."""
        state = self._state(checkpoint)
        if state is not None and plan_in_state_dict(state) is not None:
            return True
        return checkpoint.get("lrpet_factorized") is not None or \
            (checkpoint.get("meta") or {}).get(PLAN_METADATA_KEY) is not None

    def compressed_plan_of(self, path: str) -> Optional[RankPlan]:
        """The plan of a local compressed checkpoint file, or None when it holds a dense model."""
        from lrpet_dense.io import load_checkpoint_safe

        ckpt = load_checkpoint_safe(path)
        return self.plan_from_checkpoint(ckpt) if self.is_compressed(ckpt) else None

    def load_state_(self, model: nn.Module, checkpoint: Mapping[str, Any], path: str = "the checkpoint", *,
                    dense_only: bool = False) -> nn.Module:
        """Load a checkpoint dict's weights into ``model`` strictly; a compressed one first builds its
        factorised convs (:func:`~lrpet_dense.core.enable_compressed_loading_`).

        ``module.`` prefixes (a DDP-wrapped model's) are stripped. Any missing, unexpected or mis-shaped
        key is an error (the frameworks' own loaders only warn), and so are NaN/Inf weights.

        Raises:
            ValueError: naming ``path``: no state dict, a compressed one with ``dense_only``, NaN/Inf
                weights, or keys that do not match the model.
        """
        from lrpet_dense.io import check_finite_state

        from .factorize import enable_compressed_loading_

        state = self._state(checkpoint)
        if state is None:
            state = checkpoint if all(isinstance(v, torch.Tensor) for v in checkpoint.values()) and checkpoint else None
        if state is None:
            other = {"model": "a detectron2 or plain PyTorch checkpoint?", "state_dict": "an mmengine (mmseg) "
                     "checkpoint?"}
            hint = next((f" ({h})" for k, h in other.items() if k != self.checkpoint_key and k in checkpoint), "")
            raise ValueError(f"checkpoint {path!r} holds no model state dict (no {self.checkpoint_key!r} entry; it "
                             f"has {summarize_names(list(checkpoint))}){hint}")
        if dense_only and self.is_compressed(checkpoint):
            raise ValueError(f"checkpoint {path!r} is already compressed (factorised); give the dense training "
                             "checkpoint it was made from")
        check_finite_state(state, f"checkpoint {path!r}")
        metadata = getattr(state, "_metadata", None)
        fixed = type(state)((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items()) \
            if isinstance(state, dict) else dict(state)
        if metadata is not None:
            fixed._metadata = metadata  # type: ignore[attr-defined]
        model = enable_compressed_loading_(self.unwrap(model))
        try:
            model.load_state_dict(fixed, strict=True)
        except RuntimeError as e:  # missing / unexpected keys, size mismatches
            keys = model.state_dict().keys()
            raise ValueError(f"checkpoint {path!r} does not match the config's model: "
                             f"{summarize_load_error(str(e), len(keys), len(keys & fixed.keys()))}") from None
        return model
