"""The LRPET compression report: one implementation for both frameworks.

The framework adapters measure (params and MACs with the frameworks' own counters, accuracy with
their evaluators, weight spectra); this package times both models in their deploy form
(:mod:`~lrpet_dense.report.timing`: interleaved rounds, a speed-up above the MACs ratio flagged as
noise) and turns those measurements into ``report.md``, ``report.json`` and PNG figures. It imports torch, numpy and matplotlib (Agg), never
detectron2 or mmseg.

Example:
    >>> from lrpet_dense.report import write_report  # doctest: +SKIP
    >>> paths = write_report(measured, "output/quickstart/report_det")  # doctest: +SKIP
    >>> paths["markdown"]  # doctest: +SKIP
    'output/quickstart/report_det/report.md'

Use ``tools/report.py`` to measure and write a report for a detectron2 or mmseg checkpoint.
"""
from .history import load_projection_history
from .measure import (DEPLOY_FORM, TOY_SMOKE_CHECK, RunMeasurer, initial_weights_match, measure_latency_pair,
                      measure_run, singular_values, spectra_layers)
from .timing import MAX_QUARTILE_RATIO, NOISE_RULE, SpeedUp, Timing, judge_speedup, time_interleaved
from .write import REPORT_VERSION, render_markdown, write_report, write_summary

__all__ = [
    "load_projection_history", "measure_latency_pair", "singular_values", "spectra_layers", "initial_weights_match",
    "RunMeasurer", "measure_run", "render_markdown", "write_report", "write_summary", "REPORT_VERSION",
    "DEPLOY_FORM", "TOY_SMOKE_CHECK", "Timing", "SpeedUp", "time_interleaved", "judge_speedup", "NOISE_RULE",
    "MAX_QUARTILE_RATIO",
]
