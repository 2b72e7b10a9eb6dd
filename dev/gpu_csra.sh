#!/usr/bin/env bash
# The CSRA ablation of issue 18: single-step vs multi-step vs multi-step + CSRA, from scratch, at equal data
# (the carried dev/carry/smollm2.train.tar.xz) and equal iterations, several seeds; then the real loop's
# acceptance per task of every draft (grouped head, greedy, speculation forced). Needs the SmolLM2 GGUF on the
# machine (dev/README.md). Nine drafts do not fit one 10-minute call: split them, e.g.
#   RUNS="single:0 multi:0 csra:0 single:1 multi:1" bash dev/gpu_csra.sh train
#   RUNS="csra:1 single:2 multi:2 csra:2" bash dev/gpu_csra.sh train && bash dev/gpu_csra.sh eval
# (calls back to back on one warm machine: the drafts stay in /tmp/coral_runs). Back: $OUT/csra_train.jsonl (each
# run's final teacher-forced evaluation), $OUT/csra_acc (the acceptance tables, eval).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ITERS=${ITERS:-300}
COMMON=(--iters "$ITERS" --max-seq-len 4096 --batch-tokens 16384 --lr 8e-4 --eval-every 0)
flags() {  # the variant's loss flags
  case "$1" in
  single) echo "--unroll-steps 1 --w-csra 0" ;;
  multi) echo "--unroll-steps 3 --w-csra 0" ;;
  csra) echo "--unroll-steps 3 --w-csra 0.1" ;;
  *) echo "unknown variant $1 (single | multi | csra)" >&2; return 2 ;;
  esac
}
case "${1:-train}" in
train)
  for run in ${RUNS:?name the runs, e.g. RUNS=\"single:0 multi:0 csra:0\"}; do
    variant=${run%%:*}; seed=${run##*:}
    f=$(flags "$variant") || exit 2
    # shellcheck disable=SC2086
    # the drafts and logs stay on the machine (a call returns at most 8 files); one summary line a run comes back
    RUN="csra_${variant}_s$seed" OUT=/tmp/csra_out bash dev/gpu_data.sh train smollm2 "${COMMON[@]}" $f \
      --seed "$seed" | tail -1 | sed "s/^/{\"run\": \"csra_${variant}_s$seed\", \"last\": /; s/$/}/" | tee -a "$OUT/csra_train.jsonl"
  done
  ;;
eval)
  drafts=$(cd /tmp/coral_runs && ls -d csra_*/ | tr -d / | sed 's|.*|&=/tmp/coral_runs/&|' | paste -sd,)
  timeout "${EVAL_S:-400}" python3 -m coral_fast.benchmarks.acceptance --drafts "$drafts" --heads grouped \
    --temperatures 0 --out-dir "$OUT/csra_acc" 2>&1 | grep -v -E "Converting and de-quantizing|Loading weights" | tail -14
  ;;
esac
exit 0
