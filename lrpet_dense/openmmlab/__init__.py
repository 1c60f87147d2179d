"""The mmengine-level part of LRPET, shared by the mmseg and mmdet adapters.

mmsegmentation and mmdetection run on the same mmengine runner, write the same checkpoints and keep
their norms the same way, so one layer serves both; the task packages (:mod:`lrpet_dense.mmseg`,
:mod:`lrpet_dense.mmdet`) add only what their models differ in (the model type, the plan's forward,
the outputs checked in float64, evaluation). Import a task package, not this one: it registers its
adapter, its LRPET model types and, through this package, the hook::

    custom_imports = dict(imports=['lrpet_dense.mmdet'], allow_failed_imports=False)   # or lrpet_dense.mmseg
    custom_hooks = [dict(type='LRPETHook', target_macs_cut=0.3, interval=500)]
    model = dict(type='LRPETFasterRCNN')  # mmseg: LRPETEncoderDecoder; loads compressed checkpoints

- ``hook``: :class:`LRPETHook` (registered in mmengine's root ``HOOKS`` registry, so found from the
  ``mmseg`` and ``mmdet`` scopes alike);
- ``adapter``: :class:`OpenMMLabAdapter` (checkpoint layout, compressed loading, ``load_model``),
  :func:`register_adapter` / :func:`adapter_for` (which task serves a model);
- ``model``: :class:`LRPETModelMixin` (the LRPET model types), :func:`enable_for_stock_models`;
- ``pairing``: :func:`pair_convs`, :func:`unwrap_model`; ``config``: :func:`lrpet_config`;
  ``checkpoint``: :func:`allow_mmengine_checkpoints` (stock mmengine checkpoints load with
  ``torch.load(weights_only=True)``).
"""
from .adapter import (CHECKPOINT_KEY, MODEL_TYPE_KEY, NOTE_KEY_FORMAT, PLAN_KEY, OpenMMLabAdapter, adapter_for,
                      register_adapter, registered_adapters)
from .checkpoint import allow_mmengine_checkpoints
from .config import hook_options, lrpet_config
from .hook import LRPETHook
from .model import LRPETModelMixin, enable_for_stock_models, guard_training_
from .pairing import default_include, find_norm, pair_convs, unwrap_model

allow_mmengine_checkpoints()

__all__ = [
    "LRPETHook", "OpenMMLabAdapter", "register_adapter", "adapter_for", "registered_adapters", "LRPETModelMixin",
    "enable_for_stock_models", "guard_training_", "pair_convs", "default_include", "find_norm", "unwrap_model",
    "lrpet_config", "hook_options", "allow_mmengine_checkpoints", "CHECKPOINT_KEY", "PLAN_KEY", "MODEL_TYPE_KEY",
    "NOTE_KEY_FORMAT",
]
