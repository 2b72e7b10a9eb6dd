#!/usr/bin/env bash
# The loop watch end to end (docs/loop.md, "Loops start rounds"): the engine's loop with and without it, each
# against its own plain mode in the same run, answers to their EOS, the 16-token chain, compile-draft; one call.
#   bash dev/gpu_loopwatch.sh smollm2       the full task suite (needs the SmolLM2 GGUF on the machine, ~6 min)
#   bash dev/gpu_loopwatch.sh gemma3-270m   the continuation task (after the seven Gemma carry calls, ~5 min)
#   bash dev/gpu_loopwatch.sh MODEL alpha   the policy's EMA weight instead: 0.3 (before) against the default
# Back: $OUT/nowatch/e2e_suite.* and $OUT/watch/e2e_suite.* (md, json, csv, png); with alpha, $OUT/ema0.3 and
# $OUT/default. dev/loopwatch_table.py puts the two side by side.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=${1:-smollm2}
case "$MODEL" in
smollm2) TASKS=(--suite full) ;;
gemma3-270m) TASKS=(--models gemma3-270m --tasks continuation --suite full) ;;
*) echo "usage: bash dev/gpu_loopwatch.sh smollm2|gemma3-270m [alpha]" >&2; exit 2 ;;
esac
SIDES=(nowatch watch)
[ "${2:-}" = alpha ] && SIDES=(ema0.3 default)
for side in "${SIDES[@]}"; do
  flags=()
  [ "$side" = nowatch ] && flags=(--loop-streak 0)
  [ "$side" = ema0.3 ] && flags=(--ema-alpha 0.3)
  python3 -m coral_fast.benchmarks.e2e "${TASKS[@]}" --no-hf --lookup 16 --stop-at-eos "${flags[@]}" \
    --out-dir "$OUT/$side" 2>&1 | grep --line-buffered -v -E "Converting and de-quantizing|Loading weights" | tail -14
done
