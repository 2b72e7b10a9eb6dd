#!/usr/bin/env bash
# Acceptance against data size (issue 18), one device call on the warm machine that just ran
# `dev/gpu_data.sh generate smollm2` (the data is in /tmp/coral_data/smollm2): the coral draft trained on
# the first 1/4, 1/2 and all of the answer tokens at equal iterations and flags, then the acceptance
# benchmark over the three (greedy, grouped and dense heads). Back: $OUT/scale/ (drafts' logs, acc/).
#   source dev/device_setup.sh && ITERS=600 bash dev/gpu_scale.sh      (env ITERS, FRACTIONS="4 2 1")
set -o pipefail
OUT=${OUT:-/tmp/out}; export OUT
S="$OUT/scale"; mkdir -p "$S"
DATA=/tmp/coral_data/smollm2
TOTAL=$(python3 -c "from coral_fast.training.data import load_shards; print(int(load_shards('$DATA')['loss_mask'].sum()))") || exit 2
echo "answer tokens in $DATA: $TOTAL"
DRAFTS=()
for f in ${FRACTIONS:-4 2 1}; do
  n=$((TOTAL / f))
  RUN=tok$n bash dev/gpu_data.sh train smollm2 --max-train-tokens "$n" --iters "${ITERS:-600}" --max-seq-len 4096 \
    --batch-tokens 16384 --lr 8e-4 --eval-every 200 2>&1 | grep -E '"train_seqs"|"final_eval"|rror' | cut -c1-300
  mv "$OUT/tok$n.train.log" "$S/" 2>/dev/null; rm -rf "$OUT/tok$n"
  DRAFTS+=("tok$n=/tmp/coral_runs/tok$n")
done
timeout 200 python3 -m coral_fast.benchmarks.acceptance --drafts "$(IFS=,; echo "${DRAFTS[*]}")" --heads grouped,dense \
  --temperatures 0 --out-dir "$S/acc" 2>&1 | grep -v -E "Converting and de-quantizing|Loading weights" | tail -20
