#!/usr/bin/env bash
# Self-distillation data across several 10-minute device calls (issue 18): token-only shards made on the
# GPU, brought back in parts, kept here, carried up again when needed. docs/training.md, "At scale".
#
# Here (the CPU machine), the data lives in dev/data/MODEL/ (ignored through .git/info/exclude).
#   bash dev/gpu_data.sh pack MODEL          -> dev/carry/MODEL.state.tar.gz: meta.json, prompts/, the
#                                               names of finished shards (what generation needs to resume)
#   bash dev/gpu_data.sh pack-train MODEL    -> dev/carry/MODEL.train.tar.xz: meta.json + the shards (xz over
#                                               the whole tar: 7.4M answer tokens in 6.9 MB, gzip 16 MB)
#   bash dev/gpu_data.sh unpack MODEL DIR    <- DIR/MODEL.new.tar.part* (a run's files) into dev/data/MODEL/
# On the device (run tool; carry dev/carry with the call that brings the state, and the model parts as
# dev/README.md says; the work folder /tmp/coral_data/MODEL survives between calls on a warm machine):
#   source dev/device_setup.sh && bash dev/gpu_data.sh generate MODEL --synth 40000 --samples 3 --batch-size 2048 --gen-rows 256 --time-budget-s 470
#   source dev/device_setup.sh && [RUN=name] bash dev/gpu_data.sh train MODEL --time-budget-s 420 [coral-fast train flags]
#     (trains on the carried MODEL.train.tar.xz, else on what generate left in /tmp/coral_data/MODEL)
# generate: runs `coral-fast data` on the work folder (finished shards are skipped), then tars the files
# this call added into $OUT/MODEL.new.tar.part00, part01, ... (15 MiB each: the device returns files of
# at most 16 MiB, 8 files, 64 MiB in all; the call refuses to return more than 60 MB).
set -euo pipefail
MODE=${1:?usage: dev/gpu_data.sh pack|pack-train|unpack|generate|train MODEL [args]}
MODEL=${2:?name the model: smollm2 | gemma3-270m}
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOCAL="$ROOT/dev/data/$MODEL"
CARRY="$ROOT/dev/carry"
WORK="/tmp/coral_data/$MODEL"
OUT=${OUT:-/tmp/out}
MAX_BACK=$((60 * 1000 * 1000))

exclude() {  # keep the data out of git (the device tool carries ignored folders named in `carry`)
  local ex
  ex=$(cd "$ROOT" && git rev-parse --git-path info/exclude 2>/dev/null) || return 0
  [[ "$ex" = /* ]] || ex="$ROOT/$ex"
  mkdir -p "$(dirname "$ex")"
  touch "$ex"
  grep -qx '/dev/data/' "$ex" || echo '/dev/data/' >>"$ex"
  grep -qx '/dev/carry/' "$ex" || echo '/dev/carry/' >>"$ex"
}

untar() {  # ARCHIVE DIR [MEMBER-TO-SKIP]: python's tarfile reads xz (the device image may lack the xz tool)
  python3 - "$@" <<'PY'
import sys, tarfile
archive, folder, skip = sys.argv[1], sys.argv[2], sys.argv[3:]
with tarfile.open(archive) as tar:
    members = [m for m in tar.getmembers() if m.name not in skip]
    kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    tar.extractall(folder, members=members, **kw)
PY
}

has_stand_ins() {  # the work folder still names shards that live on the CPU machine (generate's empty files)
  find "$WORK" -name 'shard_*' -size 0 | grep -q .
}

case "$MODE" in
pack)
  exclude
  mkdir -p "$LOCAL" "$CARRY"
  (cd "$LOCAL" && ls shard_*.safetensors 2>/dev/null >done.txt || true)
  tar -czf "$CARRY/$MODEL.state.tar.gz" -C "$LOCAL" done.txt $(cd "$LOCAL" && ls -d meta.json prompts 2>/dev/null)
  size=$(stat -c %s "$CARRY/$MODEL.state.tar.gz")
  echo "$CARRY/$MODEL.state.tar.gz: $size bytes, $(wc -l <"$LOCAL/done.txt") finished shards"
  [ "$size" -le $((36 * 1024 * 1024)) ] || echo "over 36 MiB: carry it in a call of its own (the tracked files take ~25 MB of the 64 MiB)"
  ;;
pack-train)
  exclude
  mkdir -p "$CARRY"
  rm -f "$CARRY/$MODEL.train.tar.gz"  # the older gzip form
  tar -cf - -C "$LOCAL" meta.json $(cd "$LOCAL" && ls shard_*.safetensors) | xz -9e -T0 >"$CARRY/$MODEL.train.tar.xz"
  echo "$CARRY/$MODEL.train.tar.xz: $(stat -c %s "$CARRY/$MODEL.train.tar.xz") bytes (64 MiB a call, tracked files included)"
  ;;
unpack)
  FROM=${1:?the folder holding $MODEL.new.tar.part* (files_at of the run)}
  exclude
  mkdir -p "$LOCAL"
  cat "$FROM"/"$MODEL".new.tar.part* | tar -x -C "$LOCAL"
  echo "$LOCAL: $(ls "$LOCAL" | grep -c '^shard_') shards"
  ;;
generate)
  mkdir -p "$WORK" "$OUT"
  if [ -f "$CARRY/$MODEL.state.tar.gz" ] && [ ! -f "$WORK/.unpacked" ]; then
    tar -xzf "$CARRY/$MODEL.state.tar.gz" -C "$WORK"
    touch "$WORK/.unpacked"
  fi
  # finished shards that live on the CPU machine: empty stand-ins, so `coral-fast data` skips them
  if [ -f "$WORK/done.txt" ]; then
    while read -r name; do [ -e "$WORK/$name" ] || : >"$WORK/$name"; done <"$WORK/done.txt"
  fi
  stamp="$WORK/.stamp"
  : >"$stamp"
  sleep 1
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  # a hard stop (GEN_TIMEOUT s) leaves time to pack: a shard cut short is a .tmp file, never returned
  timeout "${GEN_TIMEOUT:-520}" python3 -m coral_fast.training.data --model "$MODEL" --out "$WORK" --no-progress "$@" 2>&1 |
    grep --line-buffered -v -E "Converting and de-quantizing|Loading weights" | tee "$OUT/data.log" || true
  (cd "$WORK" && find . -newer "$stamp" -type f ! -name '.*' ! -name '*.tmp' -size +0 | sort >"$WORK/.new")
  echo "new files: $(wc -l <"$WORK/.new")"
  tar -cf "$WORK/.new.tar" -C "$WORK" -T "$WORK/.new"
  size=$(stat -c %s "$WORK/.new.tar")
  if [ "$size" -gt "$MAX_BACK" ]; then
    echo "the new files are $size bytes, over $MAX_BACK: run again with a smaller --time-budget-s (they stay in $WORK while the machine is warm)"
    exit 3
  fi
  split -b 15M -d -a 2 "$WORK/.new.tar" "$OUT/$MODEL.new.tar.part"
  rm "$WORK/.new.tar"
  (cd "$WORK" && ls shard_*.safetensors >done.txt)  # a next call on this machine returns only its own files
  ls -l "$OUT"
  ;;
train)
  # the data: a carried dev/carry/MODEL.train.tar.xz, what `generate` left on this warm machine, or both (the
  # carried shards then fill generate's empty stand-ins of the shards it skipped)
  DATA="/tmp/coral_data/$MODEL-train"
  if [ -f "$CARRY/$MODEL.train.tar.xz" ] && [ -f "$WORK/meta.json" ]; then
    [ -f "$WORK/.merged" ] || { untar "$CARRY/$MODEL.train.tar.xz" "$WORK" meta.json && touch "$WORK/.merged"; }
    if has_stand_ins; then
      echo "the carried data does not fill every shard $WORK names: pack-train again after unpacking every call" >&2
      exit 2
    fi
    DATA="$WORK"
  elif [ -f "$CARRY/$MODEL.train.tar.xz" ]; then
    mkdir -p "$DATA"
    [ -f "$DATA/meta.json" ] || untar "$CARRY/$MODEL.train.tar.xz" "$DATA"
  elif [ -f "$WORK/meta.json" ] && ! has_stand_ins; then
    DATA="$WORK"
  else
    echo "no data: carry dev/carry/$MODEL.train.tar.xz (pack-train) or run generate on this machine first" >&2
    exit 2
  fi
  RUN=${RUN:-$MODEL}  # several drafts on one machine: RUN=name each
  mkdir -p "$OUT"
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  # checkpoints stay on the machine (/tmp/coral_runs); the fp16 draft and the log come back
  python3 -m coral_fast.training.cli --model "$MODEL" --data "$DATA" --out "/tmp/coral_runs/$RUN" --no-progress "$@" 2>&1 |
    grep --line-buffered -v -E "Converting and de-quantizing|Loading weights" | tee "$OUT/$RUN.train.log"
  mkdir -p "$OUT/$RUN"
  cp "/tmp/coral_runs/$RUN"/{config.json,model.safetensors} "$OUT/$RUN/"
  cp "/tmp/coral_runs/$RUN"/log.jsonl "$OUT/$RUN/" 2>/dev/null || true
  ;;
*)
  echo "unknown mode $MODE: pack | pack-train | unpack | generate | train" >&2
  exit 2
  ;;
esac
