#!/usr/bin/env bash
# One device call: self-distillation data + a draft + its evaluation in the real loop (+ the ablation).
# Needs the target's GGUF assembled by dev/device_setup.sh (dev/README.md): SmolLM2 from
# .carry/smol1 + .carry/smol2, Gemma 3 270M from .carry/gem1 .. .carry/gem5, one chunk per call, the
# last call running this script. Everything lands in $OUT:
#   $OUT/<model>/{config.json,model.safetensors}  the trained draft (fp16) -> coral_fast/drafts/<model>/
#   $OUT/results.json, $OUT/ablation.md             numbers -> bench/results/ablation_<model>.md
#   $OUT/train_main.jsonl, $OUT/log                 training logs
# Usage (device tool): source dev/device_setup.sh && bash dev/gpu_train.sh [--model gemma3-270m] [pipeline args]
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MODEL=smollm2
prev=""
for arg in "$@"; do
  [ "$prev" = "--model" ] && MODEL="$arg"
  case "$arg" in --model=*) MODEL="${arg#--model=}" ;; esac
  prev="$arg"
done
case "$MODEL" in
  smollm2) NEED=CORAL_FAST_SMOLLM2_GGUF; CHUNKS=".carry/smol1 and .carry/smol2" ;;
  gemma3-270m) NEED=CORAL_FAST_GEMMA3_GGUF; CHUNKS=".carry/gem1 .. .carry/gem5" ;;
  *) NEED="" ;;
esac
if [ -n "$NEED" ] && [ -z "${!NEED:-}" ]; then
  echo "$NEED is not set: carry $CHUNKS, one per call, back to back (dev/README.md)" | tee "$OUT/log"
  exit 2
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
bash "$(dirname "$0")/gpu_info.sh" | tee "$OUT/log"
python3 -m coral_fast.training.pipeline --model "$MODEL" --out "$OUT" --no-progress "$@" 2>&1 | grep --line-buffered -v -E "Converting and de-quantizing|Loading weights" | tee -a "$OUT/log"
