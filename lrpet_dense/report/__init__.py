"""The LRPET compression report: one implementation for both frameworks.

The framework adapters measure (params and MACs with the frameworks' own counters, accuracy with
their evaluators, CPU latency, weight spectra); this package only turns those measurements into
``report.md``, ``report.json`` and PNG figures. It imports torch, numpy and matplotlib (Agg), never
detectron2 or mmseg.

Example:
    >>> from lrpet_dense.report import write_report  # doctest: +SKIP
    >>> paths = write_report(measured, "output/quickstart/report_det")  # doctest: +SKIP
    >>> paths["markdown"]  # doctest: +SKIP
    'output/quickstart/report_det/report.md'

Use ``tools/report.py`` to measure and write a report for a detectron2 or mmseg checkpoint.
"""
from .history import load_projection_history
from .measure import RunMeasurer, initial_weights_match, measure_latency, measure_run, singular_values, spectra_layers
from .write import REPORT_VERSION, render_markdown, write_report, write_summary

__all__ = [
    "load_projection_history", "measure_latency", "singular_values", "spectra_layers", "initial_weights_match",
    "RunMeasurer", "measure_run", "render_markdown", "write_report", "write_summary", "REPORT_VERSION",
]
