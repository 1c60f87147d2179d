#!/usr/bin/env bash
# The main job on the embedded default: generate a small PASCAL-VOC-format dataset, train Faster
# R-CNN R50-C4 (detectron2) and PSPNet R50-D8 (mmseg) on it from random init with LRPET, through the
# same entry points a real user uses, compress both into factorised checkpoints, measure them and
# print one report (accuracy vs chance, params/MACs, CPU latency in the deploy form, rank plan, figures).
# The log gives each step's elapsed time and, at the start, the CPU and the load average (other jobs
# on a shared machine slow every step down). The reports time the models on one thread: on a small
# machine shared with other jobs, two threads' timings differ by several times from round to round
# (OpenMP's threads wait for each other while another job holds a core) and the report would only
# say that the timing was too noisy; one thread's agree to about 10%.
# Output: output/quickstart/ (dataset, runs, compressed checkpoints, logs, det/report, seg/report,
# report.md). Environment: LRPET_QUICKSTART_OUT (output folder), PYTHON (interpreter),
# LRPET_QUICKSTART_MMDET=1 (a third model: Faster R-CNN R50-FPN in mmdetection, trained with mmdet's own
# tools/train.py, compressed, its compressed checkpoint evaluated by mmdet's tools/test.py and reported;
# off by default: it adds minutes beyond the quickstart's time goal).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
CLI=("$PY" -m lrpet_dense)  # the lrpet-dense command of this environment
OUT=${LRPET_QUICKSTART_OUT:-$ROOT/output/quickstart}
DET_CFG=toy/faster_rcnn_lrpet_quickstart.yaml  # configs shipped with the package, found by name
SEG_CFG=$("${CLI[@]}" config-path toy/pspnet_r50-d8_lrpet_quickstart.py)
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "[quickstart $(( $(date +%s) - start ))s] $*"; }
# Each step's elapsed time: begin NAME MESSAGE ... end (logged, and summed up at the end).
STEP_TIMES=()
begin() { step_name=$1; step_t0=$(date +%s); shift; log "$*"; }
end() {
  local took=$(( $(date +%s) - step_t0 ))
  STEP_TIMES+=("$step_name ${took}s"); log "$step_name: done in ${took}s"
}
load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?"; }
log "CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//'), $(nproc --all) cores, \
load average $(load) (other jobs on the machine slow every step)"
# Run a step with its full output in a log file, showing only the lines that matter live (the
# frameworks' per-N-iteration loggers, projections, evaluation); on failure show the log's tail.
run() {
  local logfile=$1 pattern=$2; shift 2
  if ! "$@" 2>&1 | tee "$logfile" | { grep --line-buffered -E "$pattern" || true; }; then
    echo "FAILED: $* (full log: $logfile)"; tail -n 40 "$logfile"; exit 1
  fi
}
export LRPET_TOY_VOC="$OUT/toy_voc/VOCdevkit" LRPET_TOY_VOC_ROOT="$OUT/toy_voc"

begin dataset "generating the toy VOC dataset in $OUT/toy_voc (64 train / 16 test images, 96px, 3 classes)"
"$PY" -m lrpet_dense.data.toy_voc "$OUT/toy_voc" --train 64 --test 16 --size 96 \
  --max-objects 2 --object-size 0.3 0.6 --noise 6
end

begin det-train "detectron2: training Faster R-CNN R50-C4 with LRPET from random init (lrpet-dense train-det, $DET_CFG)"
run "$OUT/det_train.log" "iter: |LRPET projection|copypaste: [0-9]|Total training time" \
  "${CLI[@]}" train-det --config "$DET_CFG" OUTPUT_DIR "$OUT/det"
end
begin det-compress "detectron2: compressing (lrpet-dense compress det)"
run "$OUT/det_compress.log" "^factorised|^backbone |^model " \
  "${CLI[@]}" compress det --config "$DET_CFG" --checkpoint "$OUT/det/model_final.pth" \
  --output "$OUT/det/model_compressed.pth"
end

# An OpenMMLab model: NAME (seg | mmdet: the compress subcommand and OUT/NAME), PKG (mmseg | mmdet), what it
# is, its config and its evaluation's log pattern. Trained by PKG's own tools/train.py, compressed by
# lrpet-dense compress NAME; sets CKPT to the trained checkpoint.
mm_tools() { "$PY" -c "import $1, os; print(os.path.join(os.path.dirname($1.__file__), '.mim', 'tools'))"; }
openmmlab_train_compress() {
  local name=$1 pkg=$2 what=$3 cfg=$4 eval=$5
  begin "$name-train" "$pkg: training $what with LRPETHook from random init ($pkg's own tools/train.py, $cfg)"
  run "$OUT/${name}_train.log" "Iter\(train\)|LRPET projection|$eval" \
    "$PY" "$(mm_tools "$pkg")/train.py" "$cfg" --work-dir "$OUT/$name"
  CKPT=$(cat "$OUT/$name/last_checkpoint")
  end
  begin "$name-compress" "$pkg: compressing (lrpet-dense compress $name)"
  run "$OUT/${name}_compress.log" "^factorised|^backbone|^model" \
    "${CLI[@]}" compress "$name" "$cfg" "$CKPT" "$OUT/$name/model_compressed.pth"
  end
}
openmmlab_train_compress seg mmseg "PSPNet R50-D8" "$SEG_CFG" "Iter\(val\).*mIoU"
SEG_CKPT=$CKPT

begin det-report "report: detectron2 model (accuracy vs chance, params/MACs, CPU latency in the deploy form, spectra)"
run "$OUT/det_report.log" "^report written|Evaluation results|copypaste: [0-9]|latency:" \
  "${CLI[@]}" report det --config "$DET_CFG" --checkpoint "$OUT/det/model_final.pth" \
  --compressed "$OUT/det/model_compressed.pth" --out "$OUT/det/report" --threads 1 --quiet
end
begin seg-report "report: mmseg model"
run "$OUT/seg_report.log" "^report written|mIoU:|latency:" \
  "${CLI[@]}" report seg "$SEG_CFG" "$SEG_CKPT" "$OUT/seg/model_compressed.pth" --out "$OUT/seg/report" --threads 1 \
  --quiet
end

REPORTS=("$OUT/det/report" "$OUT/seg/report")
if [ "${LRPET_QUICKSTART_MMDET:-0}" = 1 ]; then
  MMDET_CFG=$("${CLI[@]}" config-path toy/faster-rcnn_r50_fpn_lrpet_quickstart.py)
  openmmlab_train_compress mmdet mmdet "Faster R-CNN R50-FPN" "$MMDET_CFG" "pascal_voc/mAP"
  MMDET_CKPT=$CKPT
  begin mmdet-test "mmdet: its own tools/test.py on the compressed checkpoint"
  run "$OUT/mmdet_test.log" "pascal_voc/mAP" \
    "$PY" "$(mm_tools mmdet)/test.py" "$MMDET_CFG" "$OUT/mmdet/model_compressed.pth" --work-dir "$OUT/mmdet/test"
  end
  begin mmdet-report "report: mmdet model"
  run "$OUT/mmdet_report.log" "^report written|mAP|latency:" \
    "${CLI[@]}" report mmdet "$MMDET_CFG" "$MMDET_CKPT" "$OUT/mmdet/model_compressed.pth" --out "$OUT/mmdet/report" \
    --threads 1 --quiet
  end
  REPORTS+=("$OUT/mmdet/report")
fi
"${CLI[@]}" report summary "${REPORTS[@]}" --out "$OUT/report.md" > /dev/null

echo
cat "$OUT/det/report/report.md"
echo
cat "$OUT/seg/report/report.md"
echo
if [ "${LRPET_QUICKSTART_MMDET:-0}" = 1 ]; then cat "$OUT/mmdet/report/report.md"; echo; fi
cat "$OUT/report.md"
echo
log "steps: ${STEP_TIMES[*]}; load average now $(load)"
log "done in $(( $(date +%s) - start ))s: summary $OUT/report.md; reports $OUT/det/report/report.md and $OUT/seg/report/report.md (+ report.json, PNG figures)"
