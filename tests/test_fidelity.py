"""The fidelity harness itself (``benchmarks/bench_fidelity.py --tiny``): every row runs through both
frameworks' trainers and evaluators, the figures files are written, and the harness's own evaluation of
the dense checkpoint equals the frameworks' tools. No accuracy or timing threshold: a few iterations on a
handful of images measure nothing but that the protocol runs end to end.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fidelity_harness_tiny(tmp_path):
    out = tmp_path / "fid"
    proc = subprocess.run([sys.executable, "benchmarks/bench_fidelity.py", "--tiny", "--workers", "2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    data = json.loads((out / "fidelity.json").read_text())
    assert (out / "fidelity.png").stat().st_size > 0
    md = (out / "fidelity.md").read_text()
    assert "## Segmentation" in md and "## Detection" in md and "## Validity checks" in md

    rows = {(r["framework"], r["method"], r["cut"]): r for r in data["summary"]["rows"]}
    seg = ["dense", "dense-ft", "svd", "svd-energy", "svd-ft", "lrp", "lrp-et", "lrpet", "lrpet-energy", "prune-ft",
           "lrpet-scratch"]
    det = ["dense", "dense-ft", "svd", "lrpet"]
    for fw, methods in (("seg", seg), ("det", det)):
        for m in methods:
            cut = None if m in ("dense", "dense-ft") else 0.5
            row = rows[(fw, m, cut)]
            assert row["n"] == 1 and all(isinstance(v, float) for v in row["values"]), row
            if cut is None:
                assert row["macs_cut"] == pytest.approx(0.0, abs=1e-12)
            else:  # counted by the framework's counter on the model that was evaluated: it is compressed
                assert 0.3 < row["macs_cut"] < 0.7, (fw, m, row["macs_cut"])
    # the low-rank rows at one cut share one plan: the same counted MACs
    for fw, methods in (("seg", ["svd", "svd-ft", "lrp", "lrp-et", "lrpet", "lrpet-scratch"]), ("det", ["svd", "lrpet"])):
        assert len({rows[(fw, m, 0.5)]["macs"][0] for m in methods}) == 1, fw
    # the pruned model is at most the LRPET model's MACs (the ratio is bisected to match)
    assert rows[("seg", "prune-ft", 0.5)]["macs"][0] <= rows[("seg", "lrpet", 0.5)]["macs"][0]
    same = [c for c in data["summary"]["checks"] if "framework's own tool" in c["check"]]
    assert len(same) == 2 and all(c["ok"] for c in same), same
    # the result files carry what is needed to read them
    assert data["cpu"] and data["date"] and "--tiny" in data["command"]
