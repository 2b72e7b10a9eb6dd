#!/usr/bin/env bash
# Source at the start of every device-tool command:  source scripts/device_setup.sh
# - installs carried wheels (gguf) into a target dir on PYTHONPATH (the GPU image has no registry)
# - puts the repo on PYTHONPATH (no pip install needed there)
# - assembles the SmolLM2 GGUF from chunks carried in .carry/smol1 and .carry/smol2 by two calls
#   made back to back (a warm machine keeps ignored files between calls); see docs/device.md
set -e
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:/tmp/pydeps:${PYTHONPATH:-}"
if [ -d .carry/wheels ] && [ ! -d /tmp/pydeps/gguf ]; then
  python3 -m pip install -q --no-deps --target /tmp/pydeps .carry/wheels/*.whl >/dev/null 2>&1 || true
fi
mkdir -p /tmp/models
for part in .carry/smol1/* .carry/smol2/*; do
  [ -f "$part" ] && cp -n "$part" /tmp/models/ || true
done
if [ -f /tmp/models/smolchunk_aa ] && [ -f /tmp/models/smolchunk_ab ] && [ ! -f /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat /tmp/models/smolchunk_aa /tmp/models/smolchunk_ab > /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
  (cd /tmp/models && echo "$(cut -d' ' -f1 < "$OLDPWD/scripts/smollm2.sha256")  SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -) || rm -f /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
fi
if [ -f /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  export CORAL_FAST_SMOLLM2_GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
fi
set +e
