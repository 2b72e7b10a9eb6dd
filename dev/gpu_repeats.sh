#!/usr/bin/env bash
# Does leaving an answer's repeats of its own n-grams out of the loss (`--skip-repeats N`) pay in the loop? One
# device call (~9 min) on a machine with the SmolLM2 GGUF and the training data in /tmp/coral_data/smollm2
# (dev/README.md): the shipped draft trained on for FT_S s twice, with and without the flag (same flags
# otherwise), then the real loop's acceptance per task of both beside the shipped one (grouped head, greedy,
# answers to their EOS). Back: $OUT/repeats.tar.gz (drafts, logs, acceptance). SKIP (default 8), FT_S (150), ACC_S (150).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RES=/tmp/repeats_results; mkdir -p "$RES"
pack() { tar -czf "$OUT/repeats.tar.gz" -C "$RES" .; }  # after each run: a call cut by its limit still returns the rest
for run in skip all; do
  flags=(); [ "$run" = skip ] && flags=(--skip-repeats "${SKIP:-8}")
  OUT=$RES RUN=ft$run bash dev/gpu_data.sh train smollm2 --init-from coral_fast/drafts/smollm2 --time-budget-s "${FT_S:-150}" \
    --iters 100000 --max-seq-len 4096 --batch-tokens 16384 --lr 4e-4 --warmup 50 --eval-every 250 "${flags[@]}" | tail -2
  pack
done
timeout "${ACC_S:-150}" python3 -m coral_fast.benchmarks.acceptance --heads grouped --temperatures 0 --stop-at-eos --mode graphs \
  --drafts ftskip=/tmp/coral_runs/ftskip,ftall=/tmp/coral_runs/ftall,shipped=coral_fast/drafts/smollm2 \
  --out-dir "$RES/acc" 2>&1 | grep --line-buffered -v -E "Converting and de-quantizing|Loading weights" | tail -14
pack
exit 0
