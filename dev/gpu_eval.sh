#!/usr/bin/env bash
# One device call after dev/gpu_drafts.sh on the same warm machine: the drafts' mean accepted length per
# task (benchmarks/acceptance: grouped vs dense head, greedy and T=0.7) and the task suite with the new
# draft (loop vs plain mode, adaptive fallback on). Back as $OUT/eval.tgz.
set -o pipefail
OUT=${OUT:-/tmp/out}; R=/tmp/coral_runs; E="$OUT/eval"; mkdir -p "$E"
quiet() { grep --line-buffered -v -E "Converting and de-quantizing|Loading weights"; }
timeout 240 python3 -m coral_fast.benchmarks.acceptance --drafts "eagle=$R/eagle,retrofit=$R/retrofit" --heads grouped,dense \
  --temperatures 0,0.7 --out-dir "$E/acc_new" 2>&1 | quiet | tee "$E/acc_new.log"
timeout 100 python3 -m coral_fast.benchmarks.acceptance --drafts "coral=$R/coral,shipped=coral_fast/drafts/smollm2" \
  --heads grouped --temperatures 0 --out-dir "$E/acc_old" 2>&1 | quiet | tee "$E/acc_old.log"
timeout 200 python3 -m coral_fast bench e2e --models smollm2 --draft "$R/eagle" --suite full --mode graphs --sampling --no-hf \
  --out-dir "$E/suite" 2>&1 | quiet | tee "$E/suite.log"
tar czf "$OUT/eval.tgz" -C "$OUT" eval && rm -rf "$E"
