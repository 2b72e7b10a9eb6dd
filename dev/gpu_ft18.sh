#!/usr/bin/env bash
# Issue 18 in one device call (~9 min) on a machine that has the SmolLM2 GGUF (dev/README.md) and the
# self-distilled data (carried dev/carry/smollm2.train.tar.gz, `bash dev/gpu_data.sh pack-train smollm2`, and/or
# what `gpu_data.sh generate` made on this machine): the shipped draft trained on for FT_S seconds on that data
# (long sequences, the task mix), a router retrofitted onto the result (its grouped head trained to propose what
# its dense head would; RETROFIT=0 skips it), then the real loop's acceptance per task of the new drafts beside the
# shipped one, same run, grouped and dense heads, greedy. Back: $OUT/ft, $OUT/ftr (the drafts, logs), $OUT/acc.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RUN=ft bash dev/gpu_data.sh train smollm2 --init-from coral_fast/drafts/smollm2 --time-budget-s "${FT_S:-360}" \
  --iters 100000 --max-seq-len 4096 --batch-tokens 16384 --lr "${FT_LR:-4e-4}" --warmup 50 "$@" | tail -2
drafts=ft=/tmp/coral_runs/ft,shipped=coral_fast/drafts/smollm2
if [ "${RETROFIT:-1}" = 1 ]; then
  RUN=ftr bash dev/gpu_data.sh train smollm2 --retrofit-router --draft /tmp/coral_runs/ft --max-seq-len 4096 | tail -1
  drafts=$drafts,ftr=/tmp/coral_runs/ftr
fi
timeout 240 python3 -m coral_fast.benchmarks.acceptance --drafts "$drafts" --heads grouped,dense --temperatures 0 \
  --out-dir "$OUT/acc" 2>&1 | grep --line-buffered -v -E "Converting and de-quantizing|Loading weights" | tail -14
exit 0
