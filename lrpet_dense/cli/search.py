"""``lrpet-dense search det|seg``: per-stage rank ratios by Bayesian optimisation (see issue "LRPET-S")."""
from __future__ import annotations

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search per-stage rank ratios with Optuna (det | seg)")

    def run(args) -> int:
        p.error("search is not implemented yet")

    p.set_defaults(run=run)
