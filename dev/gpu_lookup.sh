#!/usr/bin/env bash
# The prompt-lookup chain on the GPU in one device call (~8 min) on a machine that has the SmolLM2 GGUF
# (dev/README.md: two calls with .carry/smolA, .carry/smolB): the real loop's acceptance per task with and
# without the chain (held-out full suite, answers to their EOS, grouped and dense heads), then the speed-up over
# the engine's plain mode with and without it (full suite, compile-draft). Back: $OUT/lookup.tar.gz (acc0, accL,
# e2e_lookup0, e2e_lookupL: a call returns at most 8 files). Time limits: ACC_S (140; 0 skips them), E2E_S (150) seconds a run,
# 580 s in all; the acceptance runs use mode graphs (tau does not depend on the mode; no compile to wait for).
# LOOKUPS: the chain lengths beside 0 (default "$LOOKUP", 10), e.g. "10 14"; E2E_ARGS: more e2e flags (--stop-at-eos).
# ACC_LOOKUPS / E2E_LOOKUPS: the lengths of the acceptance / speed-up runs (default: 0 and LOOKUPS); TEMPS: the
# acceptance runs' temperatures (default 0; "0,0.7" adds sampling, with the chain serving it as by default).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RES=/tmp/lookup_results; mkdir -p "$RES"
pack() { tar -czf "$OUT/lookup.tar.gz" -C "$RES" .; }  # after each run: a call cut by its limit still returns the rest
quiet() { grep --line-buffered -v -E "Converting and de-quantizing|Loading weights"; }
LENGTHS="0 ${LOOKUPS:-${LOOKUP:-10}}"
ACC_S=${ACC_S:-140}
if [ "$ACC_S" -gt 0 ]; then  # ACC_S=0: the speed-up runs only
  for lookup in ${ACC_LOOKUPS:-$LENGTHS}; do
    timeout "$ACC_S" python3 -m coral_fast.benchmarks.acceptance --drafts shipped=coral_fast/drafts/smollm2 \
      --heads grouped,dense --temperatures "${TEMPS:-0}" --stop-at-eos --mode graphs --lookup "$lookup" --out-dir "$RES/acc$lookup" 2>&1 | quiet | tail -3
    pack
  done
fi
for lookup in ${E2E_LOOKUPS:-$LENGTHS}; do
  # shellcheck disable=SC2086
  timeout "${E2E_S:-150}" python3 -m coral_fast.benchmarks.e2e --suite full --no-hf --lookup "$lookup" ${E2E_ARGS:-} \
    --out-dir "$RES/e2e_lookup$lookup" 2>&1 | quiet | tail -4
  pack
done
exit 0
