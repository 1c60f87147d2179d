"""The package's layering, checked on the source with ``ast`` (no import needed).

- no import cycle among ``lrpet_dense``'s modules (imports inside functions count too);
- no ``from x import _private`` of a first-party name across modules (``lrpet_dense``, ``tests``,
  ``benchmarks``, ``tools``): what another module needs is public there;
- no upward import: the core imports no other part of the package but ``io``; adapters do not
  import each other or the command line; nothing but the command line's entry imports it.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY_DIRS = ("lrpet_dense", "tests", "benchmarks", "tools")

#: Each package part and the parts it may import (besides itself).
ALLOWED = {
    "lrpet_dense": {"lrpet_dense.core"},  # the package's __init__ re-exports the core
    "lrpet_dense.core": {"lrpet_dense.io"},
    "lrpet_dense.io": set(),
    "lrpet_dense.rng": set(),
    "lrpet_dense.configs": set(),
    "lrpet_dense.data": set(),
    "lrpet_dense.report": {"lrpet_dense.core", "lrpet_dense.data"},  # data: a leaf (the generated-dataset marker)
    "lrpet_dense.search": {"lrpet_dense.core", "lrpet_dense.report"},
    "lrpet_dense.detectron2": {"lrpet_dense", "lrpet_dense.core", "lrpet_dense.io", "lrpet_dense.rng",
                               "lrpet_dense.report", "lrpet_dense.search", "lrpet_dense.data"},
    # the mmengine-level part shared by the mmseg and mmdet adapters; it imports neither task package
    "lrpet_dense.openmmlab": {"lrpet_dense", "lrpet_dense.core", "lrpet_dense.io", "lrpet_dense.report",
                              "lrpet_dense.search"},
    "lrpet_dense.mmseg": {"lrpet_dense", "lrpet_dense.core", "lrpet_dense.io", "lrpet_dense.rng",
                          "lrpet_dense.report", "lrpet_dense.search", "lrpet_dense.data", "lrpet_dense.openmmlab"},
    "lrpet_dense.mmdet": {"lrpet_dense", "lrpet_dense.core", "lrpet_dense.io", "lrpet_dense.rng",
                          "lrpet_dense.report", "lrpet_dense.search", "lrpet_dense.data", "lrpet_dense.openmmlab"},
    "lrpet_dense.cli": {"lrpet_dense", "lrpet_dense.core", "lrpet_dense.io", "lrpet_dense.configs",
                        "lrpet_dense.detectron2", "lrpet_dense.mmseg", "lrpet_dense.mmdet", "lrpet_dense.report",
                        "lrpet_dense.search", "lrpet_dense.data"},
    "lrpet_dense.__main__": {"lrpet_dense.cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _files(top: str) -> Iterator[Path]:
    yield from sorted((REPO / top).rglob("*.py"))


MODULES: Dict[str, Path] = {_module_name(p): p for p in _files("lrpet_dense")}


def _imports(path: Path) -> Iterator[Tuple[int, Optional[str], List[str], int]]:
    """``(line, resolved module, imported names, level)`` of every import statement (anywhere in the file)."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, [], 0
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield node.lineno, target, [a.name for a in node.names], node.level


def _targets(path: Path) -> Set[str]:
    """The ``lrpet_dense`` modules a file imports (``from pkg import submodule`` counts as the submodule)."""
    out = set()
    for _, target, names, _ in _imports(path):
        if not target or not (target == "lrpet_dense" or target.startswith("lrpet_dense.")):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        out.update(subs or ([target] if target in MODULES else []))
        if subs and len(subs) < len(names) and target in MODULES:
            out.add(target)
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_import_cycle_in_lrpet_dense():
    graph = {m: _targets(p) - {m} for m, p in MODULES.items()}
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(m: str) -> Optional[List[str]]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_private_name_imported_across_modules():
    first_party = set(MODULES) | {_module_name(p) for top in FIRST_PARTY_DIRS[1:] for p in _files(top)} | {"conftest"}
    bad = []
    for top in FIRST_PARTY_DIRS:
        for path in _files(top):
            for line, target, names, level in _imports(path):
                if not target or (target not in first_party and not target.startswith("lrpet_dense")):
                    continue  # third-party modules are their maintainers' business
                if target == _module_name(path):
                    continue
                bad += [f"{path.relative_to(REPO)}:{line}: from {target} import {n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_no_upward_import():
    bad = []
    for module, path in MODULES.items():
        part = _part(module)
        allowed = ALLOWED.get(part)
        assert allowed is not None, f"{module}: a new part of the package; add it to ALLOWED"
        for target in _targets(path):
            if _part(target) != part and _part(target) not in allowed:
                bad.append(f"{path.relative_to(REPO)} imports {target}")
    assert not bad, "imports against the layering (core < report/search < adapters < cli):\n" + "\n".join(bad)
