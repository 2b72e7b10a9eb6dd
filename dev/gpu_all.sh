#!/usr/bin/env bash
# One device call for the whole GPU picture (~9.5 min): the engine's and the direct launch's CUDA tests,
# the task suite on SmolLM2 (loop / plain mode / HF), the 1B-8B scale configs with an 8B round profile,
# and the eager host cost of the two drop-in ops. Needs the SmolLM2 GGUF assembled (dev/README.md: three
# calls carrying .carry/smol1..3). Everything lands in $OUT/all.tgz (the device tool returns 8 files).
# Env: MODE (suite engine mode, graphs), SCALE_MODE (graphs), SCALE (all), PROMPTS (3).
set -o pipefail
OUT=${OUT:-out}; R="$OUT/r"; mkdir -p "$R"
log() { tee -a "$R/log.txt"; }
bash "$(dirname "$0")/gpu_info.sh" | log
quiet() { grep --line-buffered -v -E "Converting and de-quantizing|Loading weights"; }
timeout 100 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_generate.py -k "graphs or recapture or bf16 or direct_launch" \
  tests/test_grouped_head.py tests/test_tree_attention.py 2>&1 | tail -8 | log
timeout "${SUITE_TIMEOUT:-250}" python3 -m coral_fast bench e2e --models smollm2 --suite quick --prompts-per-task "${PROMPTS:-3}" \
  --max-new-tokens 128 --mode "${MODE:-graphs}" --sampling --temperature 0.7 --out-dir "$R" 2>&1 | quiet | log
timeout "${SCALE_TIMEOUT:-170}" python3 -m coral_fast bench e2e --suite none --scale "${SCALE:-all}" --scale-mode "${SCALE_MODE:-graphs}" \
  --profile llama3.1-8b --taus "${TAUS:-3,4,5}" --out-dir "$R" 2>&1 | quiet | log
timeout 60 python3 -m coral_fast.benchmarks.eager_host --calls 200 2>&1 | log
tar czf "$OUT/all.tgz" -C "$OUT" r && rm -rf "$R"
