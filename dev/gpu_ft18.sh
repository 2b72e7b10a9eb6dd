#!/usr/bin/env bash
# Issue 18 in one device call (~9 min) on a machine that has the SmolLM2 GGUF (dev/README.md) and the
# self-distilled data (carried dev/carry/smollm2.train.tar.xz, `bash dev/gpu_data.sh pack-train smollm2`, and/or
# what `gpu_data.sh generate` made on this machine): the shipped draft trained on for FT_S seconds on that data
# (long sequences, the task mix), then the real loop's acceptance per task of the new draft beside the shipped
# one, same run, grouped and dense heads, greedy. Back: $OUT/ft (the draft, log), $OUT/acc.
#   GROUPING=embedding: first move the shipped draft to that vocabulary grouping (a router retrofitted onto it,
#     4000 router steps, seconds), then train on from there (bench/results/router_grouping_cpu.md); that draft
#     is evaluated too.
#   EVAL_REGROUP=0: leave that regrouped draft out of the acceptance run (saves a third of it).
#   HEADS (default grouped,dense; acceptance --heads), ACC_S (default 240): the acceptance run's heads, time limit.
#   RETROFIT=1: afterwards also retrofit a fresh router onto the trained draft (did not pay: drafts_smollm2_h200.md).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
init=coral_fast/drafts/smollm2
drafts=shipped=$init
retrofit() {  # RUN DRAFT [flags]: a router retrofitted onto DRAFT, in /tmp/coral_runs/RUN
  local run=$1 draft=$2
  shift 2
  RUN=$run bash dev/gpu_data.sh train smollm2 --retrofit-router --draft "$draft" --max-seq-len 4096 --no-progress "$@" | tail -1
  rm -rf "${OUT:?}/$run" "$OUT/$run.train.log"  # a call returns 8 files: keep them for ft and acc
}
if [ -n "${GROUPING:-}" ]; then
  retrofit regroup "$init" --grouping "$GROUPING" --iters 4000
  init=/tmp/coral_runs/regroup
  [ "${EVAL_REGROUP:-1}" = 1 ] && drafts=$drafts,regroup=$init
fi
RUN=ft bash dev/gpu_data.sh train smollm2 --init-from "$init" --time-budget-s "${FT_S:-360}" \
  --iters 100000 --max-seq-len 4096 --batch-tokens 16384 --lr "${FT_LR:-4e-4}" --warmup 50 "$@" | tail -2
drafts=ft=/tmp/coral_runs/ft,$drafts
if [ "${RETROFIT:-0}" = 1 ]; then
  retrofit ftr /tmp/coral_runs/ft
  drafts=$drafts,ftr=/tmp/coral_runs/ftr
fi
timeout "${ACC_S:-240}" python3 -m coral_fast.benchmarks.acceptance --drafts "$drafts" --heads "${HEADS:-grouped,dense}" --temperatures 0 \
  --out-dir "$OUT/acc" 2>&1 | grep --line-buffered -v -E "Converting and de-quantizing|Loading weights" | tail -14
exit 0
