#!/usr/bin/env bash
# The main job on the embedded default: generate a small PASCAL-VOC-format dataset, train Faster
# R-CNN R50-C4 (detectron2) and PSPNet R50-D8 (mmseg) on it with LRPET through the same entry
# points a real user uses, then compress both into factorised checkpoints.
# Output: output/quickstart/ (dataset, detectron2 run, mmseg run, compressed checkpoints, logs).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${LRPET_QUICKSTART_OUT:-$ROOT/output/quickstart}
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "[quickstart $(( $(date +%s) - start ))s] $*"; }

log "generating the toy VOC dataset in $OUT/toy_voc"
"$PY" -m lrpet_dense.data.toy_voc "$OUT/toy_voc" --train 16 --test 8 --size 128

log "detectron2: training Faster R-CNN R50-C4 with LRPET (tools/train_det.py)"
LRPET_TOY_VOC="$OUT/toy_voc/VOCdevkit" "$PY" tools/train_det.py \
  --config configs/toy/faster_rcnn_lrpet_toy.yaml OUTPUT_DIR "$OUT/det" > "$OUT/det_train.log" 2>&1 \
  || { tail -n 40 "$OUT/det_train.log"; exit 1; }
grep -E "lrpet|AP" "$OUT/det_train.log" | tail -n 8 || true
log "detectron2: compressing"
LRPET_TOY_VOC="$OUT/toy_voc/VOCdevkit" "$PY" tools/compress_det.py --config configs/toy/faster_rcnn_lrpet_toy.yaml \
  --checkpoint "$OUT/det/model_final.pth" --output "$OUT/det/model_compressed.pth"

MMSEG_TRAIN=$("$PY" -c "import mmseg, os; print(os.path.join(os.path.dirname(mmseg.__file__), '.mim', 'tools', 'train.py'))")
log "mmseg: training PSPNet R50-D8 with LRPETHook (mmseg's own tools/train.py)"
LRPET_TOY_VOC_ROOT="$OUT/toy_voc" "$PY" "$MMSEG_TRAIN" configs/toy/pspnet_r50-d8_lrpet_toy.py \
  --work-dir "$OUT/seg" > "$OUT/seg_train.log" 2>&1 || { tail -n 40 "$OUT/seg_train.log"; exit 1; }
grep -E "lrpet|mIoU" "$OUT/seg_train.log" | tail -n 6 || true
log "mmseg: compressing"
LRPET_TOY_VOC_ROOT="$OUT/toy_voc" "$PY" tools/compress_seg.py configs/toy/pspnet_r50-d8_lrpet_toy.py \
  "$OUT/seg/iter_3.pth" "$OUT/seg/model_compressed.pth"
log "done: outputs in $OUT"
