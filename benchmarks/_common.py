"""What the benchmark scripts share: the CPU's name for the figures, a plain-text table, the JSON output."""
from __future__ import annotations

import json
import platform
from typing import Any, Optional, Sequence


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), which every published figure is quoted with."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns under a header and a rule."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda row: "  ".join(v.rjust(w) for v, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def save_json(path: Optional[str], data: Any) -> None:
    """Write ``data`` to ``path`` (indented); nothing without a path."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
