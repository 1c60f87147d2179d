"""What makes LRPET training in detectron2 correct, for every trainer: ``DefaultTrainer``, LazyConfig, your own.

- :func:`prepare_model_`: a model that loads compressed checkpoints whatever its meta architecture, and,
  when the weights to load are a compressed checkpoint, is factorised *before* the optimizer is built
  around it (so fine-tuning trains the factorised layers);
- LRPET on a factorised model is refused (by :class:`~lrpet_dense.core.LRPETSession`, which every
  :class:`~lrpet_dense.detectron2.LRPETHook` builds);
- a model built dense that a loaded checkpoint factorised is refused for training
  (:class:`~lrpet_dense.detectron2.CompressedAwareCheckpointer` with ``for_training=True``);
- evaluation during training leaves the global RNG streams where it found them
  (:func:`~lrpet_dense.rng.preserved_rng_state`, :func:`rng_preserving`), and the training loader seeds
  its own generator (:func:`train_loader_seed`), so a resumed run replays the uninterrupted one;
- :class:`~lrpet_dense.detectron2.RNGStateHook` checkpoints the RNG states for exact ``--resume``.

:class:`LRPETTrainer` is detectron2's ``DefaultTrainer`` with all of them (subclass it as you would
``DefaultTrainer``: ``lrpet-dense train-det`` does, adding evaluators); a LazyConfig training script
calls the functions (``docs/detectron2.md`` has the script).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, List, Optional

import torch
from torch import nn

import detectron2.utils.comm as comm
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks

from lrpet_dense.core import enable_compressed_loading_, factorize_
from lrpet_dense.rng import preserved_rng_state

from .checkpoint import RNGStateHook
from .config import lrpet_config, lrpet_enabled
from .deploy import CompressedAwareCheckpointer, compressed_plan_of
from .hook import LRPETHook, insert_before_checkpointer
from .pairing import unwrap_model

__all__ = ["prepare_model_", "train_loader_seed", "rng_preserving", "LRPETTrainer"]

logger = logging.getLogger(__name__)


def prepare_model_(model: nn.Module, weights: str = "") -> nn.Module:
    """Make a freshly built detector ready for training or evaluation with LRPET checkpoints, in place.

    Compressed checkpoints then load into it whatever its type
    (:func:`~lrpet_dense.core.enable_compressed_loading_`); and when ``weights`` (``MODEL.WEIGHTS`` /
    ``train.init_checkpoint``) is a compressed checkpoint, its factorised convs are built now, so that an
    optimizer built afterwards holds them. Call it right after building the model, before the optimizer.

    Returns:
        ``model``.
    """
    model = enable_compressed_loading_(unwrap_model(model))
    plan = compressed_plan_of(weights)
    if plan is not None:
        names = factorize_(model, plan, from_weights=False)
        logger.info("LRPET: %s is a compressed checkpoint: built its %d factorised convs (plan p=%g) before "
                    "loading it", weights, len(names), plan.ratio)
    return model


def train_loader_seed(seed: int) -> int:
    """The seed of this worker's training loader: ``seed + rank`` (``seed < 0``: a random one).

    Pass it as ``build_detection_train_loader(..., seed=...)``: the loader's own generator, not the
    global torch RNG, then draws its workers' base seed when its iterator is created, which a resumed
    run does at another step than the original.
    """
    return seed + comm.get_rank() if seed >= 0 else int(torch.randint(2 ** 31, ()))


def rng_preserving(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (an evaluation, e.g. ``do_test``) run without moving the global RNG streams, so whether and how
    often a run evaluates does not change the random draws of its training steps."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with preserved_rng_state():
            return fn(*args, **kwargs)
    return wrapped


class LRPETTrainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with LRPET (``cfg.LRPET``, see :func:`~lrpet_dense.detectron2.add_lrpet_config`)
    and the guards of this module.

    - the model is built with :func:`prepare_model_` (a compressed ``MODEL.WEIGHTS`` is factorised before
      the optimizer);
    - with ``LRPET.ENABLED``, an :class:`~lrpet_dense.detectron2.LRPETHook` placed before ``PreciseBN`` and
      the checkpointer (every checkpoint holds projected weights); a factorised model is refused;
    - the checkpointer loads compressed checkpoints strictly and refuses one that would factorise a model
      built dense;
    - :class:`~lrpet_dense.detectron2.RNGStateHook`, a seeded training loader and RNG-preserving
      evaluation, so ``--resume`` replays the uninterrupted run when its data stream does.

    Every ``cfg.LRPET`` option is checked when it is constructed (:func:`~lrpet_dense.detectron2.lrpet_config`:
    a ``ValueError`` naming the key, the value and the allowed range), before the model, the optimizer or
    the data loader is built. Subclass it as you would ``DefaultTrainer`` (e.g. to add ``build_evaluator``).
    """

    def __init__(self, cfg):
        lrpet_config(cfg)  # every LRPET option checked before anything is built
        super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg):
        return prepare_model_(super().build_model(cfg), cfg.MODEL.WEIGHTS)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, seed=train_loader_seed(cfg.SEED))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        with preserved_rng_state():  # evaluating must not shift the training steps' random draws
            return super().test(cfg, model, evaluators)

    def build_hooks(self) -> List[Optional[hooks.HookBase]]:
        # DefaultTrainer built a plain DetectionCheckpointer just before calling this; the periodic
        # checkpointer and resume_or_load use this one.
        self.checkpointer = CompressedAwareCheckpointer(self.model, self.cfg.OUTPUT_DIR, for_training=True,
                                                        trainer=self.checkpointer.checkpointables["trainer"])
        ret = super().build_hooks()
        if lrpet_enabled(self.cfg):
            insert_before_checkpointer(ret, LRPETHook.from_config(self.cfg, self.model))
        # Right before the checkpointer (after PreciseBN, which draws random numbers when it runs).
        rng_hook = RNGStateHook(self.cfg.SOLVER.CHECKPOINT_PERIOD, self.cfg.SOLVER.MAX_ITER)
        at = [i for i, h in enumerate(ret) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))]
        ret.insert(at[0] if at else len(ret), rng_hook)
        return ret
