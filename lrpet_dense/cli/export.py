"""``lrpet-dense export det|seg``: ONNX export of a compressed model (see issue "Deployment speed")."""
from __future__ import annotations

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a compressed model to ONNX and check it in ONNX Runtime (det | seg)")

    def run(args) -> int:
        p.error("export is not implemented yet")

    p.set_defaults(run=run)
