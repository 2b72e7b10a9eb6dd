#!/usr/bin/env bash
# Issue 18 in one device call (~9 min) on a machine that has the SmolLM2 GGUF (dev/README.md) and carries
# dev/carry (the self-distilled data, `bash dev/gpu_data.sh pack-train smollm2`): the shipped draft trained on
# for FT_S seconds on that data (long sequences, the task mix), then the real loop's acceptance per task of the
# new draft beside the shipped one, same run, grouped and dense heads, greedy. Back: $OUT/ft (the draft, its
# log), $OUT/acc (the acceptance tables).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RUN=ft bash dev/gpu_data.sh train smollm2 --init-from coral_fast/drafts/smollm2 --time-budget-s "${FT_S:-360}" \
  --iters 100000 --max-seq-len 4096 --batch-tokens 16384 --lr "${FT_LR:-4e-4}" --warmup 50 "$@" | tail -5
timeout 200 python3 -m coral_fast.benchmarks.acceptance --drafts ft=/tmp/coral_runs/ft,shipped=coral_fast/drafts/smollm2 \
  --heads grouped,dense --temperatures 0 --out-dir "$OUT/acc" 2>&1 |
  grep --line-buffered -v -E "Converting and de-quantizing|Loading weights" | tail -14
exit 0
