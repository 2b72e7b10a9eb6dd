#!/usr/bin/env bash
# The CSRA ablation of issue 18: single-step vs multi-step vs multi-step + CSRA, from scratch, at equal data
# (the self-distilled data in /tmp/coral_data/smollm2, dev/README.md) and equal iterations, several seeds; then
# the real loop's acceptance per task of every draft (grouped head, greedy, answers to their EOS, speculation
# forced). Needs the SmolLM2 GGUF on the machine.
#   bash dev/gpu_csra.sh train   trains the RUNS (default: 3 variants x seeds 0 1 2) not yet in /tmp/coral_runs, and
#                                starts none after CALL_S seconds (default 480) less the last run's length: call it
#                                again on the same warm machine until it prints "all trained"
#   bash dev/gpu_csra.sh eval    the acceptance table of every trained draft (EVAL_S, default 420)
# Back: $OUT/csra_train.jsonl (each run's final teacher-forced evaluation), $OUT/csra_acc (eval).
# ITERS (default 250) and SEQ (max sequence length, default 2048) are the same for every run. The other levers of
# issue 18 run the same way: RUNS="unroll5:0 token1:0 fused:0 ..." (variants below; eval takes every csra_* draft).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ITERS=${ITERS:-250}
COMMON=(--iters "$ITERS" --max-seq-len "${SEQ:-2048}" --batch-tokens 16384 --lr 8e-4 --eval-every 0)
RUNS=${RUNS:-single:0 multi:0 csra:0 single:1 multi:1 csra:1 single:2 multi:2 csra:2}
flags() {  # the variant's loss flags
  case "$1" in
  single) echo "--unroll-steps 1 --w-csra 0" ;;
  multi) echo "--unroll-steps 3 --w-csra 0" ;;
  csra) echo "--unroll-steps 3 --w-csra 0.1" ;;
  # the other levers, each against csra (the defaults): more unrolled steps, the token loss's weight,
  # EAGLE-3-style inputs (three target layers fused)
  unroll5) echo "--unroll-steps 5 --w-csra 0.1" ;;
  token1) echo "--unroll-steps 3 --w-csra 0.1 --w-token 1.0" ;;
  fused) echo "--unroll-steps 3 --w-csra 0.1 --feature-layers eagle3" ;;
  *) echo "unknown variant $1 (single | multi | csra | unroll5 | token1 | fused)" >&2; return 2 ;;
  esac
}
case "${1:-train}" in
train)
  started=$SECONDS last=0 left=""
  for run in $RUNS; do
    variant=${run%%:*}; seed=${run##*:}
    name="csra_${variant}_s$seed"
    [ -f "/tmp/coral_runs/$name/model.safetensors" ] && continue
    if [ $((SECONDS - started + last)) -gt "${CALL_S:-480}" ]; then left="$left $run"; continue; fi
    f=$(flags "$variant") || exit 2
    t0=$SECONDS
    rm -rf "/tmp/coral_runs/$name"  # a run cut by the call's limit starts again
    # shellcheck disable=SC2086
    # the drafts and logs stay on the machine (a call returns at most 8 files); one summary line a run comes back
    line=$(RUN=$name OUT=/tmp/csra_out bash dev/gpu_data.sh train smollm2 "${COMMON[@]}" $f --seed "$seed" | tail -1)
    last=$((SECONDS - t0))
    echo "{\"run\": \"$name\", \"call_seconds\": $last, \"last\": $line}" | tee -a "$OUT/csra_train.jsonl"
  done
  if [ -n "$left" ]; then echo "left for the next call:$left"; else echo "all trained"; fi
  ;;
eval)
  drafts=$(cd /tmp/coral_runs && ls -d csra_*/ | tr -d / | sed 's|.*|&=/tmp/coral_runs/&|' | paste -sd,)
  timeout "${EVAL_S:-420}" python3 -m coral_fast.benchmarks.acceptance --drafts "$drafts" --heads grouped \
    --temperatures 0 --stop-at-eos --mode graphs --out-dir "$OUT/csra_acc" 2>&1 |
    grep --line-buffered -v -E "Converting and de-quantizing|Loading weights" | tail -14
  ;;
esac
exit 0
