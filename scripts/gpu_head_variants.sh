#!/usr/bin/env bash
# Grouped LM head (issue 2): old and new epilogue/merge variants side by side, one device call (< 5 min).
#   source scripts/device_setup.sh && bash scripts/gpu_head_variants.sh
# Per case: correctness of every variant (bf16, fresh random inputs, poisoned outputs, against the
# fp32 reference), then two timings each of: one call a CUDA-graph replay after an L2 flush (the
# table's usual column) and one graph of 16 back-to-back calls on 16 input sets / 16; partials alone.
# Variants: old = committed kernel before this change (argmax rounds, 4-warp merge); packed = the new
# default; the rest at M=1 only (see VARIANTS in coral_fast/benchmarks/head.py). A failing variant is
# logged and skipped; a timed-out shape leaves the others. Logs and tables under $OUT; summary last.
set -o pipefail
OUT=${OUT:-out/head_variants}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'tl.topk', hasattr(triton.language, 'topk'))" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
status=0
# the variants that use newer triton features (tl.topk, launch_pdl) last: a CUDA error poisons the
# process, so it can only cost the variants after it (each shape is its own process)
ALL=old,packed,old-merge-1warp,packed-merge-4warps,packed-no-prefetch,packed-epi-topk-merge,topk,topk-epi-packed-merge,packed-pdl
run() {  # run SHAPE TIMEOUT VARIANTS [CASES]
  local shape=$1 limit=$2 variants=$3 cases=${4:-}
  timeout "$limit" python3 -m coral_fast bench head --variants "$variants" --shapes "$shape" \
    ${cases:+--cases "$cases"} --out "$OUT/variants_$shape.md" > "$OUT/variants_$shape.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || { echo "[$shape] exit $rc (124 = timed out; 1 = a variant failed)"; status=1; }
  grep -E "^(device|empty|==|  )" "$OUT/variants_$shape.log" | cut -c1-200
}
run llama3 120 "$ALL"
run qwen2.5 50 old,packed,packed-epi-topk-merge,packed-pdl 1:random,16:shared,64:shared,64:random
run gemma3 50 old,packed,packed-epi-topk-merge,packed-pdl 1:random,16:shared,64:shared,16:random
# bf16 correctness of the default path at the test suite's odd shapes, and the key/chunked-merge tests
timeout 50 python3 -m pytest -q tests/test_grouped_head.py tests/test_grouped_head_variants.py \
  -k "bf16_gpu or roundtrip or chunked" > "$OUT/tests.log" 2>&1 || { echo "tests: exit $? (see tests.log)"; status=1; }
tail -3 "$OUT/tests.log"
echo
echo "== summary (us; x = / floor; graph1 = one call a graph after an L2 flush; chain = 16-call graph / 16)"
for f in "$OUT"/variants_*.md; do
  [ -f "$f" ] && grep -E "^\| [a-z]" "$f" | grep -v "^| case" | awk -F'|' '{printf "%-21s fl%-6s %-21s %-8s g1 %-13s %-5s ch %-13s %-5s p %s\n", $2, $3, $5, $6, $7, $8, $9, $10, $11}'
done
exit $status
