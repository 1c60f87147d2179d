"""What detectron2 checkpoints need beyond LRPET: ``RNGStateHook`` checkpoints the RNGs so ``--resume`` is exact.

detectron2's ``--resume`` restores the model, optimizer, scheduler, iteration and the state of
every hook with a ``state_dict``, but not the random number generators: the resumed run re-seeds
them from ``cfg.SEED``. Its RPN and ROI samplers then permute the sampled candidates differently
(``detectron2.modeling.sampling.subsample_labels`` uses the global torch RNG), so losses are summed
in another order and the weights drift from the uninterrupted run's. This hook stores the global
torch (CPU, and CUDA when used), numpy and Python RNG states of every worker in each checkpoint
(plain data: ``torch.load(weights_only=True)`` still works) and puts them back just before the
first resumed step.

It is separate from :class:`~lrpet_dense.detectron2.LRPETHook` because it concerns every run, with
or without LRPET (``tools/train_det.py`` registers it for both). It makes the *random draws* of a
resumed run equal to the uninterrupted run's; for the *data* to be equal too:

* creating the training data loader's iterator must not draw from the global torch RNG (torch's
  ``DataLoader`` draws its workers' base seed from it unless it has its own ``generator``):
  ``tools/train_det.py`` builds the loader with ``seed=``, which gives it one;
* evaluation during training must not draw from it either (``tools/train_det.py`` runs it under
  :func:`~lrpet_dense.rng.preserved_rng_state`);
* the sampler must give the resumed run the images the uninterrupted run would have seen. Stock
  detectron2 does not promise this: its ``TrainingSampler`` restarts its (``cfg.SEED``-seeded)
  index stream from the start on resume, and with ``DATALOADER.NUM_WORKERS > 0`` the workers'
  augmentation RNGs restart too. Resumed weights then equal the uninterrupted run's only when the
  data stream does not depend on the position (e.g. every batch is the same, as in the tests).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

from lrpet_dense.rng import capture_rng_state, restore_rng_state

__all__ = ["RNGStateHook"]

logger = logging.getLogger(__name__)


class RNGStateHook(HookBase):
    """Save every worker's RNG states in checkpoints; restore them before the first resumed step.

    Place it right before the ``PeriodicCheckpointer`` (after ``PreciseBN``, whose data loading
    draws random numbers at the iterations it runs), as ``tools/train_det.py`` does.

    Args:
        period: the checkpoint period (``SOLVER.CHECKPOINT_PERIOD``). In distributed runs the
            states of all workers are gathered after these steps (and the last one), so that the
            main process can save them.
        max_iter: the number of training steps (``SOLVER.MAX_ITER``).
    """

    def __init__(self, period: int, max_iter: int):
        if isinstance(period, bool) or not isinstance(period, int) or period <= 0:
            raise ValueError(f"RNGStateHook: period must be a positive integer (SOLVER.CHECKPOINT_PERIOD), "
                             f"got {period!r}")
        self.period, self.max_iter = period, int(max_iter)
        self._gathered: Optional[List[Dict[str, Any]]] = None
        self._gathered_iter: Optional[int] = None
        self._pending: Optional[Dict[str, Any]] = None

    def _checkpointed(self, iteration: int) -> bool:
        return (iteration + 1) % self.period == 0 or iteration + 1 >= self.max_iter

    def before_step(self):
        if self._pending is not None:
            # As late as possible: nothing between here and the step's own draws moves the streams.
            restore_rng_state(self._pending)
            self._pending = None
            logger.info("RNG states restored from the checkpoint before iteration %d", self.trainer.iter)

    def after_step(self):
        # A collective: every worker calls it at the same iterations; only the main process saves.
        if comm.get_world_size() > 1 and self._checkpointed(self.trainer.iter):
            self._gathered = comm.all_gather(capture_rng_state())
            self._gathered_iter = self.trainer.iter

    def state_dict(self) -> Dict[str, Any]:
        """``{"states": [one state per worker, by rank]}`` (plain data), or ``{}`` when unknown.

        In a distributed run the states gathered after the current step are returned; a save at
        another time (e.g. a manual ``checkpointer.save``) has none and stores nothing.
        """
        if comm.get_world_size() == 1:
            return {"states": [capture_rng_state()]}
        if self._gathered is not None and self._gathered_iter == getattr(self.trainer, "iter", None):
            return {"states": list(self._gathered)}
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        states = state_dict.get("states") or []
        world, rank = comm.get_world_size(), comm.get_rank()
        if len(states) != world:
            logger.warning("the checkpoint holds RNG states of %d worker(s), this run has %d: the RNGs are not "
                           "restored, so the resumed run's random draws differ from the original run's",
                           len(states), world)
            return
        self._pending = states[rank]
