#!/usr/bin/env bash
# `coral-fast bench e2e` on the GPU, one device-tool call per part (after `source dev/device_setup.sh`):
#   bash dev/gpu_e2e.sh suite   SmolLM2 (the carried GGUF) + its shipped draft: task suite quick (PROMPTS a
#                                   task, 128 tokens), greedy + sampling at 0.7, loop / plain / HF static
#                                   -> $OUT/e2e_suite.{json,csv,md,png}, $OUT/suite.log
#   bash dev/gpu_e2e.sh scale   random weights of Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-7B, Gemma-3-1B on the
#                                   device, profile of a Llama-3.1-8B round -> $OUT/e2e_scale.{json,csv,md,png}, scale.log
#   bash dev/gpu_e2e.sh tests   the loop's CUDA tests -> $OUT/tests.log
# Each part is sized to finish in ~8 minutes; results files are rewritten as tasks / configs finish, so a
# timeout still leaves what was measured. Env: MODELS (smollm2), MODE (suite engine mode: graphs | compile;
# default graphs), PROMPTS (per task, 3), TASKS (all), SCALE (all), SCALE_MODE (graphs), TAUS (3,4,5),
# BENCH_TIMEOUT (seconds, 550), BENCH_ARGS (more flags).
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
what=${1:-suite}
bash "$(dirname "$0")/gpu_info.sh" | tee "$OUT/gpu.txt"
quiet() { grep --line-buffered -v -E "Converting and de-quantizing|Loading weights"; }
case "$what" in
  suite)
    echo "smollm2 gguf: ${CORAL_FAST_SMOLLM2_GGUF:-missing}" | tee -a "$OUT/gpu.txt"
    timeout "${BENCH_TIMEOUT:-550}" python3 -m coral_fast bench e2e --models "${MODELS:-smollm2}" --suite quick \
      --prompts-per-task "${PROMPTS:-3}" --tasks "${TASKS:-all}" --max-new-tokens 128 --mode "${MODE:-graphs}" \
      --sampling --temperature 0.7 --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 | quiet | tee "$OUT/suite.log"
    ;;
  scale)
    timeout "${BENCH_TIMEOUT:-550}" python3 -m coral_fast bench e2e --suite none --scale "${SCALE:-all}" \
      --scale-mode "${SCALE_MODE:-graphs}" --profile llama3.1-8b --taus "${TAUS:-3,4,5}" --out-dir "$OUT" \
      ${BENCH_ARGS:-} 2>&1 | quiet | tee "$OUT/scale.log"
    ;;
  tests)
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_generate.py tests/test_sampling.py \
      tests/test_fusion.py -k cuda 2>&1 | tail -30 | tee "$OUT/tests.log"
    ;;
  *)
    echo "usage: bash dev/gpu_e2e.sh suite|scale|tests" >&2; exit 2 ;;
esac
