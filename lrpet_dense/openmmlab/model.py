"""OpenMMLab models that load compressed LRPET checkpoints: the LRPET model types and the stock ones.

:class:`LRPETModelMixin` makes a task's model class an LRPET model type (mmseg
``LRPETEncoderDecoder``, mmdet ``LRPETFasterRCNN``, ``LRPETRetinaNet``): dense, it is exactly the
stock class (same arguments, same state-dict keys); a state dict that carries a rank plan builds
the planned factorised convs before its weights are copied, so ``mmseg.apis.init_model`` /
``mmdet.apis.init_detector`` and the tools' ``load_from`` load compressed checkpoints; with
``factorized_from=`` it is built factorised (to fine-tune a compressed model); a training forward of
a model factorised while loading (after the optimizer was built) is refused.

The LRPET type is what makes a config safe wherever it is used: a config naming it cannot be built
without importing lrpet_dense. A stock type (``EncoderDecoder``, ``FasterRCNN``, ...) gets the same
loading in every process that imported a task package (``custom_imports``):
:func:`enable_for_stock_models` attaches it to every model of the task's base classes as it is built.
Where nothing of lrpet_dense is imported, mmengine's loader fills only the layers whose keys match
and prints the rest as a warning headed by the compressed checkpoint's note
(:data:`lrpet_dense.openmmlab.adapter.NOTE_KEY_FORMAT`).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from lrpet_dense.core import RankPlan, enable_compressed_loading_, factorize_
from lrpet_dense.core.factorize import check_trainable_, model_plan

__all__ = ["LRPETModelMixin", "enable_for_stock_models", "guard_training_"]


def _refuse_training_forward(module: nn.Module, args) -> None:
    if module.training:
        check_trainable_(module)


def guard_training_(model: nn.Module) -> nn.Module:
    """Let ``model`` load compressed checkpoints (:func:`~lrpet_dense.core.enable_compressed_loading_`) and
    refuse its training-mode forwards once a compressed checkpoint factorised it while loading (after
    the optimizer was built: training would not update the factorised convs). In place; idempotent."""
    enable_compressed_loading_(model)
    if not getattr(model, "_lrpet_training_guarded", False):
        model.register_forward_pre_hook(_refuse_training_forward)
        object.__setattr__(model, "_lrpet_training_guarded", True)
    return model


_STOCK_BASES: Tuple[type, ...] = ()
_handle = None


def _on_registration(module: nn.Module, name: str, submodule: Optional[nn.Module]) -> None:
    # The first submodule a model registers (mmengine's BaseModel: its data_preprocessor) is the
    # earliest point at which the model exists as an nn.Module; one isinstance check per registration.
    if isinstance(module, _STOCK_BASES) and not getattr(module, "_lrpet_training_guarded", False):
        guard_training_(module)


def enable_for_stock_models(*bases: type) -> None:
    """From now on, every model of one of ``bases`` (e.g. mmdet's ``BaseDetector``) built in this process
    loads compressed checkpoints whatever its registered type (:func:`guard_training_`). Idempotent.

    Uses torch's global module-registration hook (one isinstance check per submodule registration).
    """
    global _STOCK_BASES, _handle
    _STOCK_BASES = tuple(dict.fromkeys(_STOCK_BASES + tuple(bases)))
    if _handle is None:
        _handle = register_module_module_registration_hook(_on_registration)


class LRPETModelMixin:
    """Makes an OpenMMLab model class an LRPET model type (see the module docs); first in the bases.

    Args:
        factorized_from: a compressed checkpoint whose plan the model is built with (factorised from
            the start), so that fine-tuning it trains the factorised layers: the runner builds the
            optimizer before it loads ``load_from``, so layers installed while loading would not be
            in the optimizer (training such a model is an error). Defaults to None (dense).
        *args, **kwargs: as for the stock class.
    """

    def __init__(self, *args, factorized_from: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        guard_training_(self)
        if factorized_from is not None:
            from .adapter import OpenMMLabAdapter

            plan = OpenMMLabAdapter().compressed_plan_of(factorized_from)
            if plan is None:
                raise ValueError(f"factorized_from={factorized_from!r} is not a compressed checkpoint (no LRPET plan "
                                 "in its state dict); give the output of lrpet-dense compress")
            factorize_(self, plan, from_weights=False)

    def loss(self, inputs, data_samples):
        check_trainable_(self)  # not silently "fine-tuning" layers the optimizer does not hold
        return super().loss(inputs, data_samples)

    @property
    def lrpet_plan(self) -> Optional[RankPlan]:
        """The plan of the factorised layers installed, or None while dense."""
        return model_plan(self)
