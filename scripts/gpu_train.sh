#!/usr/bin/env bash
# One device call: self-distillation data + the shipped SmolLM2 draft + its evaluation + the ablation.
# Needs the SmolLM2 GGUF assembled by scripts/device_setup.sh (docs/device.md: carry .carry/smol1 in a
# first call, then .carry/smol2 with this script). Everything lands in $OUT:
#   $OUT/smollm2/{config.json,model.safetensors}  the trained draft (fp16) -> coral_fast/drafts/smollm2/
#   $OUT/results.json, $OUT/ablation.md              numbers -> bench/results/ablation_smollm2.md
#   $OUT/train_main.jsonl, $OUT/log                  training logs
# Usage (device tool): source scripts/device_setup.sh && bash scripts/gpu_train.sh [pipeline args]
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -z "${CORAL_FAST_SMOLLM2_GGUF:-}" ]; then
  echo "CORAL_FAST_SMOLLM2_GGUF is not set: carry .carry/smol1 and .carry/smol2 (docs/device.md)" | tee "$OUT/log"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee "$OUT/log"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" 2>&1 | tee -a "$OUT/log"
python3 -m coral_fast.training.pipeline --model smollm2 --out "$OUT" --no-progress "$@" 2>&1 | grep -v -E "Converting and de-quantizing|Loading weights" | tee -a "$OUT/log"
