#!/usr/bin/env bash
# What closes issue 16, in two device calls (dev/README.md: the SmolLM2 GGUF comes in two halves, .carry/smolA
# then .carry/smolB, while the Gemma draft is moved out of the tree for these calls):
#   PART=ops    (~4 min, no model needed): CUDA tests of the drop-in ops, their eager host cost -> $OUT/eh
#   PART=engine (~9 min): CUDA tests of the engine and the replay cache, the full task suite loop vs plain mode
#               in graphs ($OUT/suite) and, in the time left, in compile-draft ($OUT/suite2) and continuous vs
#               per-call batched decode ($OUT/bd)
# Every step has a timeout that keeps the call under the device's 600 s.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep --line-buffered -v -E "Converting and de-quantizing|Loading weights"; }
left() { echo $(( ${BUDGET:-580} - SECONDS )); }  # seconds left of this call
case "${PART:-engine}" in
ops)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_tree_attention.py \
    tests/test_grouped_head.py 2>&1 | tail -4 | tee "$OUT/check_ops.log"
  timeout 120 python3 -m coral_fast.benchmarks.eager_host --calls 300 --out "$OUT/eh" 2>&1 | grep -E "^\|" | tail -8
  ;;
engine)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_generate.py tests/test_replay.py \
    2>&1 | tail -4 | tee "$OUT/check.log"
  timeout 200 python3 -m coral_fast bench e2e --models smollm2 --suite full --mode graphs --no-hf \
    --out-dir "$OUT/suite" 2>&1 | quiet > "$OUT/suite.log"
  grep -E "^\| (task|multi|code|math|trans|summ|qa|rag|\*\*overall)" "$OUT/suite.log" | head -9
  # the draft's steps compiled, the target's captured: what it does to a round (R = round / plain step)
  timeout "$(left)" python3 -m coral_fast bench e2e --models smollm2 --suite full \
    --mode "${MODE2:-compile-draft}" --no-hf --out-dir "$OUT/suite2" 2>&1 | quiet > "$OUT/suite2.log"
  grep -E "warm-up|^\| \*\*overall" "$OUT/suite2.log" | head -3
  [ "$(left)" -gt 60 ] && timeout "$(left)" python3 -m coral_fast.benchmarks.batched_decode --rows 256 \
    --cache 1024 --modes graphs --waves 4 --out "$OUT/bd" 2>&1 | quiet | tail -6
  ;;
esac
exit 0
