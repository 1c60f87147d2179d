#!/usr/bin/env bash
# Create (or reuse) .venv/ at the repository root and install the whole stack into it:
# torch, torchvision, detectron2, mmcv (with its compiled ops), mmengine, mmsegmentation, mmdetection,
# pycocotools, fvcore and this package (editable, with its dev extras).
#
# detectron2 is not on PyPI and mmcv 2.1.0 has no PyPI wheel for torch 2.14. They come from a
# wheelhouse when one is found (LRPET_WHEELHOUSE, else the wheels/ folder of a third_party folder:
# LRPET_THIRD_PARTY, or a workspace's third_party folder beside the checkout, tried below); otherwise
# they are built from source: detectron2 from LRPET_DETECTRON2_SRC (a path, archive or git URL;
# default: the third_party source archive, else the upstream repository) and mmcv from PyPI's sdist
# (slow: ~7 min on 2 cores). Wheels only fit the torch they were built against, hence the torch pin below.
#
# Usage: bash scripts/setup_env.sh            (idempotent: a second run installs nothing new)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
VENV="$ROOT/.venv"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
FRAMEWORK_PINS=(detectron2==0.6 mmcv==2.1.0)
start=$(date +%s)
log() { echo "[setup_env $(( $(date +%s) - start ))s] $*"; }

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

if [ -f "$VENV/.lrpet_stack_ok" ] && "$VPY" -c "import detectron2, mmcv.ops, mmseg" 2>/dev/null; then
  log "framework stack already installed"
else
  log "installing build tools and torch"
  # setuptools<81: detectron2.model_zoo and mmcv's setup.py still import pkg_resources.
  pip_install --upgrade pip 'setuptools<81' wheel ninja
  pip_install "${TORCH_PINS[@]}"

  # A third_party folder holding the frameworks' wheels and sources: LRPET_THIRD_PARTY, else the one a
  # shared workspace may keep beside the checkout (first one found; none is fine).
  THIRD_PARTY=""
  for d in ${LRPET_THIRD_PARTY:-} "$ROOT/../shared/third_party"; do
    if [ -d "$d" ]; then THIRD_PARTY=$(cd "$d" && pwd); break; fi
  done
  WHEELHOUSE=${LRPET_WHEELHOUSE:-}
  if [ -z "$WHEELHOUSE" ] && [ -n "$THIRD_PARTY" ] && [ -d "$THIRD_PARTY/wheels" ]; then
    WHEELHOUSE="$THIRD_PARTY/wheels"
  fi
  if [ -n "$WHEELHOUSE" ] && ls "$WHEELHOUSE"/detectron2-*.whl "$WHEELHOUSE"/mmcv-*.whl >/dev/null 2>&1; then
    log "installing detectron2 and mmcv from wheelhouse $WHEELHOUSE"
    pip_install --find-links "$WHEELHOUSE" "${FRAMEWORK_PINS[@]}"
  else
    log "no wheelhouse found: building detectron2 and mmcv from source (slow)"
    D2_SRC=${LRPET_DETECTRON2_SRC:-}
    if [ -z "$D2_SRC" ] && [ -n "$THIRD_PARTY" ]; then
      D2_SRC=$(ls "$THIRD_PARTY"/detectron2-*.tar.gz 2>/dev/null | head -n 1 || true)
    fi
    D2_SRC=${D2_SRC:-git+https://github.com/facebookresearch/detectron2.git}
    pip_install --no-build-isolation "$D2_SRC"
    WORK=$(mktemp -d)
    "$VPY" -m pip download -q --no-deps --no-binary :all: mmcv==2.1.0 -d "$WORK"
    tar xzf "$WORK"/mmcv-2.1.0.tar.gz -C "$WORK"
    # torch >= 2.x headers need C++20; mmcv 2.1.0's setup.py asks for C++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$WORK"/mmcv-2.1.0/setup.py
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation "$WORK"/mmcv-2.1.0
    rm -rf "$WORK"
  fi
  log "installing mmengine, mmsegmentation, mmdetection and this package"
  # ftfy and regex: mmsegmentation imports them without declaring them.
  pip_install -e "$ROOT[all]"
  touch "$VENV/.lrpet_stack_ok"
fi
# Always refresh the editable install with its extras (cheap when satisfied) so that new entry
# points and newly pinned dependencies reach an existing .venv/ too.
pip_install -e "$ROOT[all]"
"$VPY" - <<'PY'
import torch, torchvision, detectron2, mmcv, mmengine, mmseg, mmdet, fvcore, pycocotools  # noqa: F401
import detectron2._C, mmcv.ops  # noqa: F401  compiled ops must import
from mmcv.ops import RoIAlign, nms  # noqa: F401  the ops mmdet's detectors run (mmdet checks mmcv's version)
import mmdet.apis  # noqa: F401
import optuna, onnx, onnxruntime, torch_pruning  # noqa: F401  search, export, pruning baseline
import lrpet_dense
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, detectron2 {detectron2.__version__}, "
      f"mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, mmseg {mmseg.__version__}, mmdet {mmdet.__version__}, "
      f"lrpet_dense {lrpet_dense.__version__}")
PY
log "done"
