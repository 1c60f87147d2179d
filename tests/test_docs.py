"""The documentation stays inside the repository and in step with CI and the code it shows.

- no tracked text file names a path outside the repository (``../shared``, ``METHOD.md``: the method is
  ``docs/method.md``);
- the README is short (<= 150 lines, no line over 200 characters), starts with exactly the commands CI
  runs (``.ci/run``), links every page of ``docs/``, and its plain PyTorch snippet is the one
  ``docs/pytorch.md`` runs in ``tests/test_plain.py``;
- every relative link of the README and ``docs/`` leads to a file, and every ``#anchor`` to a heading.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"

#: Strings that name a place outside the repository.
OUTSIDE = ("../shared", "METHOD.md")
#: (file, line) pairs allowed to hold one of them, with the reason.
ALLOWED_HITS = {
    # behaviour, not a citation: setup_env.sh also looks for a wheelhouse in a workspace's third_party
    # folder beside the checkout (docs/environment.md, "Wheelhouse")
    ("scripts/setup_env.sh", 'for d in ${LRPET_THIRD_PARTY:-} "$ROOT/../shared/third_party"; do'),
}
#: Folders never searched when the repository is not a git checkout.
UNTRACKED_DIRS = {".git", ".venv", "output", "work_dirs", "__pycache__", ".pytest_cache", "build", "dist"}

README_MAX_LINES = 150
README_MAX_LINE_CHARS = 200


def _tracked_files() -> List[Path]:
    """The repository's files that git tracks or would track (not ignored), or, outside a git checkout,
    every file outside build/output folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
        files = [REPO / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in REPO.rglob("*") if not UNTRACKED_DIRS.intersection(p.relative_to(REPO).parts)]
    return [p for p in files if p.is_file() and not p.is_symlink()]


def _text(path: Path):
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_file_names_a_path_outside_the_repository():
    this = Path(__file__).resolve()
    files = _tracked_files()
    assert any(p.name == "README.md" for p in files), "found no files to search"
    hits = []
    for path in files:
        if path.resolve() == this:
            continue
        text = _text(path)
        if text is None:
            continue
        rel = path.relative_to(REPO).as_posix()
        for number, line in enumerate(text.splitlines(), 1):
            if any(s in line for s in OUTSIDE) and (rel, line.strip()) not in ALLOWED_HITS:
                hits.append(f"{rel}:{number}: {line.strip()}")
    assert not hits, "paths outside the repository (cite docs/method.md, or a file of the repository):\n" + \
        "\n".join(hits)


def _code_blocks(text: str, lang: str) -> List[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def _commands(lines: List[str]) -> List[str]:
    """Shell lines without comments and blank lines."""
    out = []
    for line in lines:
        line = re.sub(r"(^|\s+)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    long = [i for i, line in enumerate(lines, 1) if len(line) > README_MAX_LINE_CHARS]
    assert not long, f"README.md lines over {README_MAX_LINE_CHARS} characters: {long}"


def test_readme_starts_with_the_commands_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    ci_commands = [c for c in _commands(ci) if not c.startswith(("set ", "cd "))]
    assert ci_commands, ".ci/run runs no command"
    text = README.read_text()
    first = re.search(r"^```bash\n(.*?)^```", text, re.S | re.M)
    assert first is not None, "README.md has no bash block"
    before = [line for line in text[: first.start()].splitlines() if line.strip()]
    assert len(before) <= 1 and all(line.startswith("# ") for line in before), \
        f"README.md must open with the commands (after its title), not {before}"
    assert _commands(first.group(1).splitlines()) == ci_commands


def test_readme_links_every_docs_page():
    text = README.read_text()
    linked = {Path(m).name for m in re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#[^)]*)?\)", text)}
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages, "docs/ has no pages"
    assert pages <= linked, f"pages the README does not link: {sorted(pages - linked)}"
    assert "](CHANGELOG.md)" in text


def test_readme_plain_pytorch_snippet_is_the_tested_one():
    readme = [b for b in _code_blocks(README.read_text(), "python") if "import lrpet_dense" in b]
    docs = _code_blocks((DOCS / "pytorch.md").read_text(), "python")
    assert readme and docs, "no plain PyTorch snippet in README.md or docs/pytorch.md"
    assert not re.search(r"^\s*(import|from)\s+(detectron2|mmseg|mmengine|mmcv)\b", readme[0], re.M)
    assert readme[0] == docs[0], "README.md's plain PyTorch loop differs from docs/pytorch.md's (which a test runs)"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path, cache: Dict[Path, Set[str]]) -> Set[str]:
    if path not in cache:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
        cache[path] = {_slug(h) for h in re.findall(r"^#{1,6}\s+(.*)$", text, re.M)}
    return cache[path]


@pytest.mark.parametrize("page", ["README.md"] + sorted(f"docs/{p.name}" for p in DOCS.glob("*.md")))
def test_relative_links_resolve(page):
    source = REPO / page
    text = re.sub(r"^```.*?^```", "", source.read_text(), flags=re.S | re.M)
    cache: Dict[Path, Set[str]] = {}
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        path = (source.parent / file).resolve() if file else source
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path, cache):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page}: broken links:\n" + "\n".join(broken)
