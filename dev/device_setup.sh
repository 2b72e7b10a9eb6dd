#!/usr/bin/env bash
# Source at the start of every device-tool command:  source dev/device_setup.sh
# - installs carried wheels (gguf) into a target dir on PYTHONPATH (the GPU image has no registry)
# - puts the repo on PYTHONPATH (no pip install needed there)
# - assembles the model GGUFs from chunks carried one per call, in calls made back to back (a warm
#   machine keeps /tmp/models between calls); see dev/README.md:
#     SmolLM2:      .carry/smol1 .. .carry/smol3 (smolpart_0..2, 31 MiB each) -> CORAL_FAST_SMOLLM2_GGUF,
#                   or .carry/smolA, .carry/smolB (smolhalf_0..1, 47 MiB each) in calls whose tree leaves
#                   out the Gemma draft (dev/README.md)
#     Gemma 3 270M: .carry/gem1 .. .carry/gem7   (gempart_0..6, 34.5 MiB each) -> CORAL_FAST_GEMMA3_GGUF
#   each checked against dev/<model>.sha256. One call carries at most 64 MiB with the tracked
#   files (~25 MB), hence the chunk sizes.
set -e
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:/tmp/pydeps:${PYTHONPATH:-}"
if [ -d .carry/wheels ] && [ ! -d /tmp/pydeps/gguf ]; then
  python3 -m pip install -q --no-deps --target /tmp/pydeps .carry/wheels/*.whl >/dev/null 2>&1 || true
fi
mkdir -p /tmp/models
for part in .carry/smol[0-9]*/* .carry/smol[AB]/* .carry/gem[0-9]*/*; do
  [ -f "$part" ] && cp -n "$part" /tmp/models/ 2>/dev/null || true
done

# _coral_assemble FILE SHA256_FILE PART...: cat the parts into /tmp/models/FILE once all are there
_coral_assemble() {
  local file="$1" sha="$2" part
  shift 2
  [ -f "/tmp/models/$file" ] && return 0
  for part in "$@"; do [ -f "/tmp/models/$part" ] || return 0; done
  (cd /tmp/models && cat "$@" > "$file")
  (cd /tmp/models && echo "$(cut -d' ' -f1 < "$sha")  $file" | sha256sum -c -) || rm -f "/tmp/models/$file"
}
_coral_assemble SmolLM2-135M-Instruct.Q4_1.gguf "$PWD/dev/smollm2.sha256" smolpart_0 smolpart_1 smolpart_2
_coral_assemble SmolLM2-135M-Instruct.Q4_1.gguf "$PWD/dev/smollm2.sha256" smolhalf_0 smolhalf_1
_coral_assemble gemma-3-270m-q4_k_m.gguf "$PWD/dev/gemma3.sha256" gempart_0 gempart_1 gempart_2 gempart_3 gempart_4 gempart_5 gempart_6
unset -f _coral_assemble
if [ -f /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  export CORAL_FAST_SMOLLM2_GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
fi
if [ -f /tmp/models/gemma-3-270m-q4_k_m.gguf ]; then
  export CORAL_FAST_GEMMA3_GGUF=/tmp/models/gemma-3-270m-q4_k_m.gguf
fi
echo "[device_setup] in /tmp/models: $(ls /tmp/models 2>/dev/null | tr '\n' ' ')"
set +e
