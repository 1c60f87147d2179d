"""LRPET for mmdetection 3.x: the ``LRPETHook``, conv-BN pairing, and factorised deployment.

Importing this package registers the ``LRPETHook`` in mmengine's ``HOOKS`` registry (the OpenMMLab
hook shared with mmseg, :mod:`lrpet_dense.openmmlab`) and :class:`LRPETFasterRCNN` and
:class:`LRPETRetinaNet` in mmdet's ``MODELS`` registry, lets every detector built from then on load
compressed checkpoints (:func:`lrpet_dense.openmmlab.enable_for_stock_models`), and allow-lists for
``torch.load(weights_only=True)`` what stock mmengine checkpoints hold, so a config only needs::

    custom_imports = dict(imports=['lrpet_dense.mmdet'], allow_failed_imports=False)
    custom_hooks = [dict(type='LRPETHook', target_macs_cut=0.3, interval=500)]
    model = dict(type='LRPETFasterRCNN')  # to load compressed checkpoints anywhere (see deploy)

The same parts, under the same names, as :mod:`lrpet_dense.detectron2` and :mod:`lrpet_dense.mmseg`,
on one contract (:class:`lrpet_dense.core.adapter.Adapter`; this framework's is :data:`ADAPTER`):

- ``config``: :func:`lrpet_config` maps the config's ``LRPETHook`` options onto
  :class:`~lrpet_dense.core.LRPETConfig`;
- ``pairing``: :func:`pair_convs` -> :class:`~lrpet_dense.core.Pairing`;
- ``hook``: :class:`LRPETHook`, :func:`build_plan`, :func:`default_plan_hw`;
- ``model``: the ``LRPETFasterRCNN`` and ``LRPETRetinaNet`` model types, :func:`raw_outputs`;
- ``deploy``: :func:`load_model`, :func:`compress_model_`, :func:`save_compressed`,
  :func:`plan_from_checkpoint`, :func:`count_complexity`, :func:`output_tensors`, :func:`to_inference_`;
  ``onnx``: :func:`export_onnx`;
- ``report``: :func:`~lrpet_dense.mmdet.report.measure`; ``search``: ``MMDetTrialRunner``.

The command line is ``lrpet-dense compress|report|export|search det-mm``; training and evaluation are
mmdet's own ``tools/train.py`` and ``tools/test.py``.
"""
from lrpet_dense.openmmlab import allow_mmengine_checkpoints, enable_for_stock_models

from .adapter import ADAPTER, MMDetAdapter, default_plan_hw
from .config import lrpet_config
from .deploy import (compress_model_, count_complexity, export_onnx, load_model, output_tensors, plan_from_checkpoint,
                     save_compressed, to_inference_)
from .hook import LRPETHook, build_plan
from .model import LRPETFasterRCNN, LRPETRetinaNet, raw_outputs
from .pairing import default_include, pair_convs, unwrap_model

allow_mmengine_checkpoints()
enable_for_stock_models(*ADAPTER.model_bases())

__all__ = [
    "lrpet_config", "pair_convs", "default_include", "unwrap_model", "build_plan", "default_plan_hw", "LRPETHook",
    "allow_mmengine_checkpoints", "LRPETFasterRCNN", "LRPETRetinaNet", "raw_outputs", "load_model",
    "plan_from_checkpoint", "compress_model_", "save_compressed", "count_complexity", "output_tensors",
    "to_inference_", "export_onnx", "ADAPTER", "MMDetAdapter",
]
