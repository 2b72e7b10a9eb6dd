#!/usr/bin/env bash
# One device call on the warm machine that just ran `dev/gpu_data.sh generate` (or with the data carried,
# see gpu_data.sh train): the drafts of issues 18 and 19 from that data, everything back as $OUT/drafts.tgz.part0..
# (and left in /tmp/coral_runs/{eagle,coral,retrofit} for a next call on the same machine).
#   eagle/    EAGLE-compatible layer (no input norm on layer 0, EAGLE's fc order): the candidate default
#   coral/    the same flags and time with the coral layer (input norm): what the EAGLE layer costs, if anything
#   fused/    the coral layer reading EAGLE-3's three target layers (--feature-layers eagle3), same flags and time
#   retrofit/ eagle/ exported in EAGLE's format (router dropped), then a router retrofitted onto the import
# Usage (device tool): source dev/device_setup.sh && bash dev/gpu_drafts.sh
#   (env TRAIN_S seconds a draft, RETROFIT_ITERS; FUSED=0 / RETROFIT=0 leave those out)
set -o pipefail
OUT=${OUT:-/tmp/out}; export OUT
mkdir -p "$OUT"
T=${TRAIN_S:-170}
FLAGS=(--max-seq-len 4096 --batch-tokens 16384 --lr 8e-4 --keep-best true --eval-every 400 --time-budget-s "$T")
RUN=eagle bash dev/gpu_data.sh train smollm2 --draft-arch eagle "${FLAGS[@]}"
RUN=coral bash dev/gpu_data.sh train smollm2 --draft-arch coral "${FLAGS[@]}"
if [ "${FUSED:-1}" != 0 ]; then
  RUN=fused bash dev/gpu_data.sh train smollm2 --draft-arch coral --feature-layers eagle3 "${FLAGS[@]}"
fi
if [ "${RETROFIT:-1}" != 0 ]; then
  python3 -m coral_fast export --format eagle "$OUT/eagle" /tmp/eagle_export 2>&1 | tee "$OUT/export.log"
  RUN=retrofit timeout 150 bash dev/gpu_data.sh train smollm2 --retrofit-router --draft /tmp/eagle_export --iters "${RETROFIT_ITERS:-1000}"
fi
# the fp16 drafts are ~9 MB each: parts of 15 MiB (the device returns files of at most 16 MiB)
cd "$OUT" && tar czf - $(ls -d eagle coral fused retrofit *.log 2>/dev/null) | split -b 15M -d -a 1 - drafts.tgz.part &&
  rm -rf eagle coral fused retrofit *.log
ls -l "$OUT"
