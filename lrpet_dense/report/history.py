"""The per-projection scalars the LRPET hooks log, read back from the frameworks' own log files.

Both hooks log the same scalars (:meth:`lrpet_dense.core.ProjectionSummary.scalars`) at each
projection: detectron2's ``JSONWriter`` writes them to ``OUTPUT_DIR/metrics.json`` (one JSON object
per line, keyed by ``"iteration"`` = steps done - 1), mmengine's ``LocalVisBackend`` to
``WORK_DIR/<timestamp>/vis_data/scalars.json`` (keyed by ``"step"`` = steps done).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, List

__all__ = ["load_projection_history", "find_log_files"]

#: The scalars read back, without the ``lrpet/`` prefix.
HISTORY_KEYS = ("energy_kept_mean", "energy_kept_min", "rel_change_mean", "rel_change_max", "time_s")


def find_log_files(run_dir: str) -> List[str]:
    """``metrics.json`` (detectron2) and ``*/vis_data/scalars.json`` (mmengine) files under ``run_dir``.

    mmengine writes one timestamped folder per run; they are returned oldest first, so a resumed
    run's projections come after the original's.
    """
    found = [os.path.join(run_dir, "metrics.json")] if os.path.isfile(os.path.join(run_dir, "metrics.json")) else []
    found += sorted(glob.glob(os.path.join(run_dir, "*", "vis_data", "scalars.json")))
    found += sorted(glob.glob(os.path.join(run_dir, "vis_data", "scalars.json")))
    return found


def load_projection_history(run_dir: str) -> List[Dict[str, float]]:
    """Every logged LRPET projection of a training run, in step order.

    Args:
        run_dir: detectron2's ``OUTPUT_DIR`` or mmengine's ``work_dir``.

    Returns:
        ``[{"step": steps done at the projection, "energy_kept_mean": ..., "energy_kept_min": ...,
        "rel_change_mean": ..., "rel_change_max": ..., "time_s": ...}, ...]`` (a failed projection
        skipped with ``on_error='skip'``: ``{"step", "time_s", "failed": True}``); a projection
        logged twice (a resumed run) keeps its last record. Empty when the run logged none.

    detectron2's ``JSONWriter`` keeps the last value of each scalar per writer period (20
    iterations by default), so projections closer together than that leave only the last one.

    Raises:
        FileNotFoundError: ``run_dir`` holds neither log file.
    """
    files = find_log_files(run_dir)
    if not files:
        raise FileNotFoundError(f"no metrics.json (detectron2) or */vis_data/scalars.json (mmengine) under {run_dir!r}")
    by_step: Dict[int, Dict[str, float]] = {}
    for path in files:
        detectron2_style = os.path.basename(path) == "metrics.json"
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line or ("lrpet/energy_kept_mean" not in line and "lrpet/failed" not in line):
                    continue
                rec = json.loads(line)
                # detectron2 stores scalars at trainer.iter (steps done - 1); mmengine at steps done.
                step = int(rec["iteration"]) + 1 if detectron2_style else int(rec["step"])
                entry = {"step": step, **{k: float(rec[f"lrpet/{k}"]) for k in HISTORY_KEYS if f"lrpet/{k}" in rec}}
                if rec.get("lrpet/failed"):  # a failed projection skipped with on_error='skip'
                    entry["failed"] = True
                by_step[step] = entry
    return [by_step[s] for s in sorted(by_step)]
