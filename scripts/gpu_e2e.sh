#!/usr/bin/env bash
# The loop on the GPU: CUDA tests, then `coral-fast bench e2e` (SmolLM2 from the carried GGUF, Gemma 3 270M
# with its real weights when scripts/device_setup.sh assembled its GGUF, else random weights of its real
# config), the loop compiled and captured. Run through the device tool after `source scripts/device_setup.sh`;
# logs and tables land in $OUT. Usage: [MODELS=smollm2] bash scripts/gpu_e2e.sh [tests|bench|all]
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
echo "smollm2 gguf: ${CORAL_FAST_SMOLLM2_GGUF:-missing}" | tee -a "$OUT/gpu.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_generate.py tests/test_sampling.py tests/test_fusion.py -k cuda 2>&1 | tail -30 | tee "$OUT/tests.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  # MODELS overrides; Gemma 3 runs on its real weights when its GGUF was assembled, else random weights
  models=${MODELS:-gemma3-270m}
  [ -z "${MODELS:-}" ] && [ -n "$CORAL_FAST_SMOLLM2_GGUF" ] && models=smollm2,gemma3-270m
  gemma_random=--gemma-random
  [ -n "${CORAL_FAST_GEMMA3_GGUF:-}" ] && gemma_random=
  # --compile: the draft/verify steps go through torch.compile before capture (~2 min per model)
  timeout ${BENCH_TIMEOUT:-540} python3 -m coral_fast bench e2e --models "$models" $gemma_random --compile \
    --max-new-tokens 128 --prompts ${PROMPTS:-8} --prompt-set ${PROMPT_SET:-builtin,heldout} --out "$OUT/e2e_h100.md" --json "$OUT/e2e_h100.json" \
    ${BENCH_ARGS:-} 2>&1 | grep -v -E "Converting and de-quantizing|Loading weights" | tee "$OUT/bench.log"
fi
