"""LRPET for mmsegmentation: the ``LRPETHook``, conv-BN pairing, and factorised deployment.

Importing this package registers :class:`LRPETHook` in mmengine's ``HOOKS`` registry and
:class:`LRPETEncoderDecoder` in mmseg's ``MODELS`` registry, lets every segmentor built from then on
load compressed checkpoints (:func:`lrpet_dense.openmmlab.enable_for_stock_models`), and allow-lists
for ``torch.load(weights_only=True)`` what stock mmengine checkpoints hold
(:mod:`lrpet_dense.openmmlab.checkpoint`), so a config only needs::

    custom_imports = dict(imports=['lrpet_dense.mmseg'], allow_failed_imports=False)
    custom_hooks = [dict(type='LRPETHook', target_macs_cut=0.3, interval=500)]
    model = dict(type='LRPETEncoderDecoder')  # to load compressed checkpoints anywhere (see deploy)

The same parts, under the same names, as :mod:`lrpet_dense.detectron2` and :mod:`lrpet_dense.mmdet`,
on one contract (:class:`lrpet_dense.core.adapter.Adapter`; this framework's is :data:`ADAPTER`); the
mmengine-level parts (hook, checkpoints, pairing, loading) are :mod:`lrpet_dense.openmmlab`'s, shared
with mmdet:

- ``config``: :func:`lrpet_config` maps the config's ``LRPETHook`` options onto
  :class:`~lrpet_dense.core.LRPETConfig` (each keyword is the field of the same name);
- ``pairing``: :func:`pair_convs` -> :class:`~lrpet_dense.core.Pairing` (sibling ``bnN``,
  ``Sequential``, ``ConvModule``);
- ``hook``: :class:`LRPETHook`, :func:`build_plan`, :func:`default_plan_hw`;
- ``model``: the ``LRPETEncoderDecoder`` model type (set it in configs that load compressed
  checkpoints: see :mod:`lrpet_dense.mmseg.deploy`);
- ``deploy``: :func:`load_model`, :func:`compress_model_`, :func:`save_compressed`,
  :func:`plan_from_checkpoint`, :func:`count_complexity`, :func:`output_tensors`, :func:`to_inference_`;
  ``onnx``: :func:`export_onnx`;
- ``report``: :func:`measure`; ``search``: ``SegTrialRunner``; ``checkpoint``:
  :func:`allow_mmengine_checkpoints`.

The command line is ``lrpet-dense compress seg | report seg | export seg | search seg``; training is
mmseg's own ``tools/train.py``.
"""
from lrpet_dense.openmmlab import allow_mmengine_checkpoints, enable_for_stock_models

from .adapter import ADAPTER, MMSegAdapter, default_plan_hw
from .config import lrpet_config
from .deploy import (compress_model_, count_complexity, export_onnx, load_model, output_tensors, plan_from_checkpoint,
                     save_compressed, to_inference_)
from .hook import LRPETHook, build_plan
from .model import LRPETEncoderDecoder
from .pairing import default_include, pair_convs, unwrap_model

allow_mmengine_checkpoints()
enable_for_stock_models(*ADAPTER.model_bases())

__all__ = [
    "lrpet_config", "pair_convs", "default_include", "unwrap_model", "build_plan", "default_plan_hw", "LRPETHook",
    "allow_mmengine_checkpoints", "LRPETEncoderDecoder", "load_model", "plan_from_checkpoint", "compress_model_",
    "save_compressed", "count_complexity", "output_tensors", "to_inference_", "export_onnx", "ADAPTER",
    "MMSegAdapter",
]
