#!/usr/bin/env bash
# Grouped LM head on the GPU: CUDA tests, then `coral-fast bench head` (table under $OUT).
# Device tool: source dev/device_setup.sh && bash dev/gpu_head.sh [bench flags, e.g. --sweep]
# HEAD_STEPS=tests,table,pytest-bench picks the steps (default tests,table);
# HEAD_BENCH_FILTER=llama3 narrows the pytest-benchmark suite (pytest -k);
# HEAD_TEST_TIMEOUT / HEAD_TABLE_TIMEOUT (seconds) cap the steps to fit a device call.
set -o pipefail
OUT=${OUT:-out/head}
mkdir -p "$OUT"
STEPS=${HEAD_STEPS:-tests,table}
bash "$(dirname "$0")/gpu_info.sh" | tee "$OUT/gpu.txt"
status=0
if [[ $STEPS == *tests* ]]; then
  timeout ${HEAD_TEST_TIMEOUT:-200} python3 -m pytest -q -rs tests/test_grouped_head.py tests/test_grouped_head_configs.py tests/test_grouping.py 2>&1 | tee "$OUT/tests.log" || status=1
fi
if [[ $STEPS == *table* ]]; then
  timeout ${HEAD_TABLE_TIMEOUT:-380} python3 -m coral_fast bench head --out "$OUT/head.md" "$@" 2>&1 | tee "$OUT/bench.log" || status=1
fi
if [[ $STEPS == *pytest-bench* ]]; then
  timeout 100 python3 -m pytest -q bench/test_bench_head.py ${HEAD_BENCH_FILTER:+-k "$HEAD_BENCH_FILTER"} --benchmark-only --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/pytest_bench.log" || status=1
fi
exit $status
