#!/usr/bin/env bash
# Tree attention on the GPU: CUDA tests, then `coral-fast bench attention` (table under $OUT).
# Device tool: source dev/device_setup.sh && bash dev/gpu_attention.sh [bench flags...]
# ATTN_STEPS=tests,table,pytest-bench picks the steps (default tests,table).
set -o pipefail
OUT=${OUT:-out/attention}
mkdir -p "$OUT"
STEPS=${ATTN_STEPS:-tests,table}
bash "$(dirname "$0")/gpu_info.sh" | tee "$OUT/gpu.txt"
status=0
if [[ $STEPS == *pytest-bench* ]]; then
  timeout 120 python3 -m pytest -q bench/test_bench_attention.py --benchmark-only --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/pytest_bench.log" || status=1
fi
if [[ $STEPS == *table* ]]; then
  timeout 420 python3 -m coral_fast bench attention --out "$OUT/attention.md" "$@" 2>&1 | tee "$OUT/bench.log" || status=1
fi
# after the timings, so that the table is taken on an idle GPU; ATTN_PYTEST_K narrows the tests
if [[ $STEPS == *tests* ]]; then
  timeout 240 python3 -m pytest -q -rs tests/test_tree_attention.py tests/test_tree.py ${ATTN_PYTEST_K:+-k "$ATTN_PYTEST_K"} 2>&1 | tee "$OUT/tests.log" || status=1
fi
exit $status
