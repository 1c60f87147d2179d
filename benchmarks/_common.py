"""What the benchmark scripts share: the CPU's name for the figures, the command line they record, a plain-text
table, the JSON output."""
from __future__ import annotations

import json
import os
import platform
import shlex
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


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that produced a result file, as a reader can type it: paths inside the repository relative to
    it, other absolute paths (this machine's folders, meaningless elsewhere) as ``PATH``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def shown(arg: str) -> str:
        if not os.path.isabs(arg):
            return arg
        rel = os.path.relpath(arg, root)
        return "PATH" if rel == ".." or rel.startswith(".." + os.sep) else rel

    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(shown(a)) for a in argv)])


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
