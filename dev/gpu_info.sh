#!/usr/bin/env bash
# The machine a device call ran on, for its logs: GPU, driver, memory, SM clock, and the library versions.
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv 2>&1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1
