"""detectron2 LazyConfig training with LRPET (``examples/detectron2_lazyconfig_train.py``, which is
detectron2's ``tools/lazyconfig_train_net.py`` with the lines ``docs/detectron2.md`` shows): a
Faster R-CNN R50-FPN (detectron2's ``common/models/mask_rcnn_fpn.py``, masks off, BN) trains on the
toy set with projections, is compressed, and the compressed checkpoint is evaluated with detectron2's
stock ``GeneralizedRCNN`` and with ``LRPETGeneralizedRCNN``."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_tool

pytest.importorskip("detectron2")

from lrpet_dense.configs import config_path  # noqa: E402

SCRIPT = REPO / "examples" / "detectron2_lazyconfig_train.py"
LAZY_CFG = config_path("toy/faster_rcnn_fpn_lrpet_lazy.py")
TINY = ["train.max_iter=5", "train.checkpointer.period=5", "train.log_period=1", "lrpet.interval=2"]


def _ap(text: str):
    m = re.search(r"copypaste: AP,AP50,AP75\s*\n.*copypaste: ([\d.naN]+),([\d.naN]+),([\d.naN]+)", text)
    assert m, "no evaluation in the output"
    return tuple(float(v) for v in m.groups())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lazyconfig_fpn_trains_compresses_and_evaluates(d2_toy_voc, tmp_path):
    from detectron2.config import LazyConfig

    from lrpet_dense.core import FactorizedConv2d
    from lrpet_dense.detectron2 import compress_model_, load_model, plan_from_checkpoint, save_compressed

    env = {"LRPET_TOY_VOC": d2_toy_voc}
    out = tmp_path / "run"
    text = run_tool([SCRIPT, "--config-file", LAZY_CFG, *TINY, f"train.output_dir={out}"], env, timeout=800)
    assert "LRPET rank plan" in text
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    projections = [(m["iteration"], m["lrpet/num_projections"]) for m in metrics if "lrpet/num_projections" in m]
    assert projections[-1] == (4, 3.0)  # projected after steps 2, 4 and 5 (the last; iteration is 0-based)

    cfg = LazyConfig.apply_overrides(LazyConfig.load(LAZY_CFG), TINY)
    model, ckpt = load_model(cfg, str(out / "model_final.pth"), dense_only=True)
    plan = plan_from_checkpoint(ckpt)
    assert plan is not None and any(n.startswith("backbone.fpn_") for n in plan.layers)
    names = compress_model_(model, plan)  # refuses weights not of their rank; checks outputs in float64
    compressed = tmp_path / "compressed.pth"
    save_compressed(model, str(compressed))

    aps = []
    for target in ("detectron2.modeling.GeneralizedRCNN", "lrpet_dense.detectron2.LRPETGeneralizedRCNN"):
        text = run_tool([SCRIPT, "--config-file", LAZY_CFG, "--eval-only", f"model._target_={target}",
                         f"train.init_checkpoint={compressed}", f"train.output_dir={tmp_path / 'eval'}"], env)
        assert f"built its {len(names)} factorised convs" in text
        aps.append(_ap(text))
    assert all(0.0 <= v <= 100.0 for v in aps[0]) and aps[0] == aps[1]  # the same computation

    # LRPET on the compressed checkpoint is refused before any step; fine-tuning it without LRPET trains it
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config-file", LAZY_CFG, *TINY,
                           f"train.init_checkpoint={compressed}", f"train.output_dir={tmp_path / 'refused'}"],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "LRPET training needs a dense model, but the model is factorised" in proc.stderr
    assert not (tmp_path / "refused" / "model_final.pth").exists()
    tuned = tmp_path / "tuned"
    run_tool([SCRIPT, "--config-file", LAZY_CFG, "train.max_iter=2", "lrpet.enabled=False",
              f"train.init_checkpoint={compressed}", f"train.output_dir={tuned}"], env)
    tuned_model, _ = load_model(cfg, str(tuned / "model_final.pth"))
    assert sum(isinstance(m, FactorizedConv2d) for m in tuned_model.modules()) == len(names)


def test_the_documented_lazyconfig_loop_is_the_example_script():
    """``docs/detectron2.md`` shows the script's ``do_train``, as it is."""
    doc = (REPO / "docs" / "detectron2.md").read_text()
    shown = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if b.startswith("def do_train"))
    script = SCRIPT.read_text()
    assert shown.strip() in script
    assert shown.count("# LRPET") >= 5
