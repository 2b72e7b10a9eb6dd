#!/usr/bin/env bash
# What closes issue 16 and measures continuous batching, one device call (~9 min), after the SmolLM2 GGUF
# is on the machine (dev/README.md; two calls with .carry/smolA, .carry/smolB when the Gemma draft is
# moved out of the tree for them). Back: $OUT/suite (the full task suite, graphs, loop vs plain mode),
# $OUT/eh (eager host cost of both drop-in ops), $OUT/bd (batched decode, continuous vs per-call batches),
# $OUT/check.log (the CUDA tests of the engine, the replay cache and the kernels), $OUT/suite2 (the suite in
# mode compile-draft).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep --line-buffered -v -E "Converting and de-quantizing|Loading weights"; }
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_generate.py tests/test_replay.py \
  tests/test_tree_attention.py tests/test_grouped_head.py 2>&1 | tail -4 | tee "$OUT/check.log"
timeout 200 python3 -m coral_fast bench e2e --models smollm2 --suite full --mode graphs --no-hf \
  --out-dir "$OUT/suite" 2>&1 | quiet > "$OUT/suite.log"
grep -E "^\| (task|multi|code|math|trans|summ|qa|rag|\*\*overall)" "$OUT/suite.log" | head -9
# the draft's steps compiled, the target's captured: what it does to a round (R = round / plain step) and the suite
timeout 240 python3 -m coral_fast bench e2e --models smollm2 --suite full \
  --mode "${MODE2:-compile-draft}" --no-hf --out-dir "$OUT/suite2" 2>&1 | quiet > "$OUT/suite2.log"
grep -E "warm-up|^\| \*\*overall" "$OUT/suite2.log" | head -3
timeout 90 python3 -m coral_fast.benchmarks.eager_host --calls 300 --out "$OUT/eh" 2>&1 | grep -E "^\|" | tail -8
timeout 120 python3 -m coral_fast.benchmarks.batched_decode --rows 256 --cache 1024 --modes graphs --waves 4 \
  --out "$OUT/bd" 2>&1 | quiet | tail -6
