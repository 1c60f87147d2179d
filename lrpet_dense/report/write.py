"""Turn measured data into ``report.md``, ``report.json`` and PNG figures (framework-free).

The measured data is one plain dict (see :func:`write_report`); the JSON file is that dict plus the
figure paths, and the Markdown is rendered from it alone, so every number a person reads in
``report.md`` is in ``report.json`` too.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from lrpet_dense.core.macs import full_rank

from .timing import MAX_QUARTILE_RATIO, SpeedUp

__all__ = ["REPORT_VERSION", "write_report", "render_markdown", "write_summary"]

logger = logging.getLogger(__name__)

REPORT_VERSION = 2  # 2: latency in interleaved rounds, judged speed-ups
_REQUIRED = ("framework", "title", "complexity", "plan")


def _fmt_count(n: Optional[float], unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {suffix}{unit}"
    return f"{n:g} {unit}".strip()


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def _cut(before: Optional[float], after: Optional[float]) -> str:
    if not before or after is None:
        return "-"
    return f"{1 - after / before:.1%}"


def _num(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _layers(plan: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    return list(plan.get("layers", []))


def _speedup(lat: Mapping[str, Any], part: str) -> SpeedUp:
    """The judged speed-up of ``part`` stored in a report's ``latency`` entry."""
    judged = lat.get("speedup")
    if not judged or part not in judged:
        raise ValueError(f"the report's latency entry holds no judged speed-up for {part!r} (a report written before "
                         f"report version {REPORT_VERSION}?): measure it again with `lrpet-dense report`")
    return SpeedUp.from_dict(judged[part])


def _spread(t: Mapping[str, Any]) -> str:
    return f"{t['median_ms']:.1f} ({t['min_ms']:.1f}-{t['max_ms']:.1f})"


def _latency_section(lat: Mapping[str, Any], dense: Mapping[str, Any], fact: Mapping[str, Any],
                     hw: Optional[Sequence[int]]) -> List[str]:
    load = [l for l in lat.get("load_average") or [] if l]
    lines = ["## CPU latency", "",
             f"Both models timed in {lat.get('form', 'the form they were loaded in')}, {lat['threads']} thread(s), "
             f"batch 1{f', {hw[0]}x{hw[1]}' if hw else ''}; {lat.get('device', 'CPU')}"
             + (f", load average (1 min) {load[0][0]:.2f} before and {load[-1][0]:.2f} after" if load else "")
             + f". {lat['warmup']} warm-up call(s) each, then {lat['rounds']} rounds that each run the dense and the "
             "factorised model once, in turn (the order alternating). Times: median (min-max) over the rounds. "
             "Speed-up: the median over the rounds of dense time / factorised time of the same round (min-max). "
             "A speed-up above the MACs ratio, or one whose rounds disagree (the middle half more than "
             f"{MAX_QUARTILE_RATIO - 1:.0%} apart), is not a result: the row says the timing was too noisy and shows "
             "the rounds' spread instead.", "",
             "| part | dense ms | factorised ms | speed-up (rounds min-max) | MACs ratio |", "|---|---:|---:|---:|---:|"]
    noisy = []
    for part in ("backbone", "model"):
        if part not in lat.get("dense", {}):
            continue
        s = _speedup(lat, part)
        name = "backbone" if part == "backbone" else "whole model"
        lines.append(f"| {name} | {_spread(lat['dense'][part])} | {_spread(lat['factorized'][part])} | {s.text()} | "
                     f"{_ratio(dense[part]['macs'], fact[part]['macs'])} |")
        if s.noisy:
            noisy.append(f"{name}: {s.reason}.")
    if noisy:
        hint = "" if lat["threads"] == 1 else " or one thread (`--threads 1`), which other jobs on the machine disturb less"
        lines += ["", f"**The timing was too noisy** (measure again on an idle machine, with more rounds (`--repeats`)"
                  f"{hint}):", ""] + [f"- {n}" for n in noisy]
    if lat.get("note"):
        lines += ["", lat["note"]]
    lines.append("")
    return lines


def render_markdown(data: Mapping[str, Any], figures: Optional[Mapping[str, str]] = None) -> str:
    """The Markdown report of one model's measured ``data`` (the dict of :func:`write_report`).

    Args:
        data: the measured data.
        figures: ``{kind: file name relative to the report}`` to embed. Defaults to none.
    """
    figures = dict(figures or {})
    lines = [f"# LRPET compression report: {data['title']}", ""]
    src = [(k, data.get(k)) for k in ("config", "checkpoint", "compressed_checkpoint", "run_dir")]
    lines += [f"- {k.replace('_', ' ')}: `{v}`" for k, v in src if v]
    plan = data["plan"]
    target = plan.get("target_macs_cut")
    lines.append(f"- rank pruning ratio p = {plan['ratio']:.4g}"
                 + (f" (solved for a {target:.0%} backbone MAC cut)" if target else ""))
    lines += [f"- {n}" for n in data.get("notes", [])]
    lines.append("")

    acc = data.get("accuracy")
    if acc:
        metric = acc["metric"]
        lines += ["## Accuracy", "",
                  f"{metric} on `{acc.get('dataset', '?')}` ({acc.get('evaluator', '')}).", "",
                  f"| model | {metric}{' (toy set: a smoke check)' if acc.get('smoke_check') else ''} |", "|---|---:|",
                  f"| projected dense (trained) | {_num(acc.get('dense'))} |",
                  f"| factorised (compressed checkpoint) | {_num(acc.get('factorized'))} |"]
        if acc.get("chance") is not None:
            lines.append(f"| chance level: {acc.get('chance_method', '')} | {_num(acc.get('chance'))} |")
        lines.append("")
        if acc.get("smoke_check"):
            lines += [f"The {metric} above is {acc['smoke_check']}.", ""]

    comp = data["complexity"]
    dense, fact = comp["dense"], comp["factorized"]
    hw = data.get("input_size")
    lines += ["## Parameters and MACs", "",
              f"Counted by {data.get('counter', 'the framework counter')}"
              + (f" for one {hw[0]}x{hw[1]} input." if hw else "."), "",
              "| part | params dense | params factorised | params cut | MACs dense | MACs factorised | MACs cut |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for part in ("backbone", "model"):
        d, f = dense[part], fact[part]
        lines.append(f"| {'backbone' if part == 'backbone' else 'whole model'} | {_fmt_count(d['params'])} | "
                     f"{_fmt_count(f['params'])} | {_cut(d['params'], f['params'])} | {_fmt_count(d['macs'])} | "
                     f"{_fmt_count(f['macs'])} | {_cut(d['macs'], f['macs'])} |")
    lines.append("")

    lat = data.get("latency")
    if lat:
        lines += _latency_section(lat, dense, fact, hw)
    for kind, caption in (("ranks", "Rank per layer (full vs kept)"),
                          ("spectra", "Singular values before and after training"),
                          ("history", "Energy kept and relative weight change at each projection")):
        if kind in figures:
            lines += [f"## {caption}", "", f"![{caption}]({figures[kind]})", ""]
            if kind == "spectra" and data.get("spectra", {}).get("initial_source"):
                lines += [f"Before training: {data['spectra']['initial_source']}.", ""]

    hist = data.get("history") or []
    if hist:
        lines += ["## Projections during training", "",
                  "| step | energy kept mean | energy kept min | rel. change mean | rel. change max | time (s) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for h in hist:
            lines.append(f"| {h['step']} | {_num(h.get('energy_kept_mean'), 4)} | {_num(h.get('energy_kept_min'), 4)} | "
                         f"{_num(h.get('rel_change_mean'), 4)} | {_num(h.get('rel_change_max'), 4)} | "
                         f"{_num(h.get('time_s'), 3)} |")
        lines.append("")

    factorized = set(data.get("factorized_layers", []))
    lines += ["## Rank plan", "", "| layer | shape (n, c, kh, kw) | rank / full | factorised |", "|---|---|---:|:---:|"]
    for layer in _layers(plan):
        lines.append(f"| `{layer['name']}` | {'x'.join(map(str, layer['shape']))} | {layer['rank']} / "
                     f"{full_rank(layer['shape'])} | {'yes' if layer['name'] in factorized else 'no'} |")
    lines.append("")
    return "\n".join(lines)


def _plot_ranks(data: Mapping[str, Any], path: str) -> None:
    import matplotlib.pyplot as plt

    layers = _layers(data["plan"])
    names = [l["name"] for l in layers]
    full = [full_rank(l["shape"]) for l in layers]
    kept = [l["rank"] for l in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 4.0))
    x = range(len(names))
    ax.bar(x, full, color="#c8d6e5", label="full rank min(n, c*kh*kw)")
    ax.bar(x, kept, color="#2e86de", label="kept rank k")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("rank")
    ax.set_title(f"{data['title']}: rank per layer (p = {data['plan']['ratio']:.3g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_spectra(data: Mapping[str, Any], path: str) -> None:
    import matplotlib.pyplot as plt

    layers = data["spectra"]["layers"]
    n = len(layers)
    cols = min(n, 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, s) in zip(axes.flat, layers.items()):
        for key, style, label in (("initial", "--", "before training"), ("final", "-", "after training")):
            values = [v for v in (s.get(key) or []) if v > 0]
            if values:
                ax.semilogy(range(1, len(values) + 1), values, style, label=label)
        ax.axvline(s["rank"], color="k", lw=0.8, ls=":", label=f"kept rank k = {s['rank']}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("index i")
        ax.set_ylabel("singular value")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{data['title']}: singular values of conv weights (n x c*kh*kw)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_history(data: Mapping[str, Any], path: str) -> None:
    import matplotlib.pyplot as plt

    hist = data["history"]
    steps = [h["step"] for h in hist]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10.0, 3.6))
    for key, label in (("energy_kept_mean", "mean over layers"), ("energy_kept_min", "worst layer")):
        a.plot(steps, [h.get(key, math.nan) for h in hist], "o-", label=label)
    a.set_title("energy kept by the top-k subspace (before ET)")
    a.set_xlabel("training step")
    a.set_ylabel(r"$\sum_{i\leq k}\sigma_i^2 / \sum_i \sigma_i^2$")
    for key, label in (("rel_change_mean", "mean over layers"), ("rel_change_max", "worst layer")):
        b.plot(steps, [h.get(key, math.nan) for h in hist], "o-", label=label)
    b.set_title("relative weight change by the projection")
    b.set_xlabel("training step")
    b.set_ylabel(r"$\|W' - W\|_F / \|W\|_F$")
    for ax in (a, b):
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        if len(steps) == 1:  # one point: a readable x range around it
            ax.set_xlim(steps[0] - 1, steps[0] + 1)
    fig.suptitle(data["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(data: Mapping[str, Any], out_dir: str) -> Dict[str, str]:
    """Write ``report.md``, ``report.json`` and the PNG figures of one model into ``out_dir``.

    Args:
        data: measured data, plain JSON types only::

            {"framework": "detectron2" | "mmseg", "title": str,
             "complexity": {"dense" | "factorized": {"backbone" | "model": {"params": int, "macs": int}}},
             "plan": RankPlan.to_dict(),
             # optional:
             "config", "checkpoint", "compressed_checkpoint", "run_dir": str, "input_size": [H, W],
             "counter": str, "notes": [str], "factorized_layers": [str],
             "accuracy": {"metric", "dataset", "evaluator", "dense", "factorized", "chance", "chance_method",
                          "smoke_check": str (on the generated toy set)},
             "latency": measure_latency_pair(...) + {"device": str, "form": str (how both models ran)},
             "history": load_projection_history(...),
             "spectra": {"initial_source": str, "layers": {name: {"rank", "initial": [...], "final": [...]}}}}

        out_dir: output folder (created).

    Returns:
        ``{"markdown": path, "json": path, "ranks" | "spectra" | "history": PNG path, ...}``.

    Raises:
        ValueError: a required key is missing.
    """
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"report data lacks required key(s) {missing}; has {sorted(data)}")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    os.makedirs(out_dir, exist_ok=True)
    figures: Dict[str, str] = {}
    jobs = [("ranks", _plot_ranks, bool(_layers(data["plan"]))),
            ("spectra", _plot_spectra, bool(data.get("spectra", {}).get("layers"))),
            ("history", _plot_history, bool(data.get("history")))]
    for kind, plot, available in jobs:
        if available:
            plot(data, os.path.join(out_dir, f"{kind}.png"))
            figures[kind] = f"{kind}.png"
    out = dict(data, version=REPORT_VERSION, figures=figures)
    json_path = os.path.join(out_dir, "report.json")
    with open(json_path, "w") as f:
        json.dump(out, f, indent=1)
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write(render_markdown(data, figures))
    logger.info("wrote the LRPET report %s (+ report.json, %d figures)", md_path, len(figures))
    return {"markdown": md_path, "json": json_path, **{k: os.path.join(out_dir, v) for k, v in figures.items()}}


def write_summary(report_dirs, path: str) -> str:
    """One short Markdown table over several reports (e.g. the quickstart's two models); returns the text.

    Args:
        report_dirs: folders holding a ``report.json`` written by :func:`write_report`.
        path: the Markdown file to write.
    """
    rows = ["| model | accuracy dense / factorised (chance) | backbone MACs cut | model MACs cut | "
            "model params cut | CPU latency speed-up (model) | report |", "|---|---|---:|---:|---:|---:|---|"]
    for d in report_dirs:
        with open(os.path.join(d, "report.json")) as f:
            data = json.load(f)
        comp = data["complexity"]
        acc = data.get("accuracy")
        acc_text = "-" if not acc else (f"{acc['metric']} {_num(acc.get('dense'))} / {_num(acc.get('factorized'))} "
                                        f"({_num(acc.get('chance'))})" + (", toy-set smoke check" if acc.get("smoke_check")
                                                                         else ""))
        lat = data.get("latency")
        speed = "-" if not lat else _speedup(lat, "model").text()
        rel = os.path.relpath(os.path.join(d, "report.md"), os.path.dirname(os.path.abspath(path)))
        rows.append(f"| {data['title']} | {acc_text} | "
                    f"{_cut(comp['dense']['backbone']['macs'], comp['factorized']['backbone']['macs'])} | "
                    f"{_cut(comp['dense']['model']['macs'], comp['factorized']['model']['macs'])} | "
                    f"{_cut(comp['dense']['model']['params'], comp['factorized']['model']['params'])} | "
                    f"{speed} | [{rel}]({rel}) |")
    text = "# LRPET summary\n\n" + "\n".join(rows) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text
