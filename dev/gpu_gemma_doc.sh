#!/usr/bin/env bash
# Issue 18's Gemma 3 270M draft for what a base model is for, continuing documents, in one device call
# (~9.5 min) on a machine holding the Gemma GGUF (dev/README.md: .carry/gem1 .. gem7, one a call):
#   1. continuation data made by the target (`--synth-mix document=1`: it continues a title into an opening,
#      then the opening into the answer, which ends 64 tokens into a loop), GEN_S seconds (default 170) into
#      /tmp/coral_data/gemma3-270m
#   2. the shipped Gemma draft (trained on chat-format answers) trained on from there, FT_S seconds (170)
#   3. the real loop's acceptance on the held-out `continuation` task, new draft beside the shipped one, same
#      run: grouped and dense heads greedy without the chain, then the default chain (grouped), 128 tokens
# Called again on the same warm machine it goes on: generation resumes where it stopped and training starts
# from the last call's draft (/tmp/coral_runs/gdoc). Back: $OUT/gemma3-270m.new.tar.part* (this call's new
# shards, for dev/gpu_data.sh unpack), $OUT/gdoc.tar.gz (the draft, training log, acceptance tables).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RES=/tmp/gdoc_results; mkdir -p "$RES"
quiet() { grep --line-buffered -v -E "Converting and de-quantizing|Loading weights"; }
pack() { tar -czf "$OUT/gdoc.tar.gz" -C "$RES" .; }
if [ -z "${CORAL_FAST_GEMMA3_GGUF:-}" ]; then
  echo "CORAL_FAST_GEMMA3_GGUF is not set: carry .carry/gem1 .. gem7, one a call, back to back (dev/README.md)"
  exit 2
fi
if ! python3 -c "import gguf" 2>/dev/null; then
  echo "the gguf package is missing: carry .carry/wheels with this call (dev/README.md)"
  exit 2
fi
GEN_S=${GEN_S:-170}
GEN_TIMEOUT=$((GEN_S + 90)) OUT="$OUT" bash dev/gpu_data.sh generate gemma3-270m --synth "${SYNTH:-20000}" \
  --synth-mix document=1 --samples "${SAMPLES:-2}" --batch-size "${BATCH:-512}" --gen-rows "${ROWS:-512}" \
  --max-new-tokens 512 --synth-temperature 0.8 --stop-loops 64 --time-budget-s "$GEN_S" | tail -4
cp "$OUT/data.log" "$RES/" 2>/dev/null; rm -f "$OUT/data.log"
init=coral_fast/drafts/gemma3-270m
[ -f /tmp/coral_runs/gdoc/model.safetensors ] && { rm -rf /tmp/gdoc_prev; cp -r /tmp/coral_runs/gdoc /tmp/gdoc_prev; init=/tmp/gdoc_prev; }
echo "training from $init"
RUN=gdoc OUT="$RES" bash dev/gpu_data.sh train gemma3-270m --init-from "$init" --time-budget-s "${FT_S:-170}" \
  --iters 100000 --max-seq-len 2048 --batch-tokens 16384 --lr "${FT_LR:-4e-4}" --warmup 50 | tail -2
pack
drafts=doc=/tmp/coral_runs/gdoc,shipped=coral_fast/drafts/gemma3-270m
for lookup in 0 10; do
  heads=grouped,dense; [ "$lookup" = 0 ] || heads=grouped
  timeout "${ACC_S:-100}" python3 -m coral_fast.benchmarks.acceptance --model gemma3-270m --drafts "$drafts" \
    --tasks continuation --heads "$heads" --temperatures 0 --max-new-tokens 128 --mode graphs --lookup "$lookup" \
    --out-dir "$RES/acc$lookup" 2>&1 | quiet | tail -6
  pack
done
exit 0
