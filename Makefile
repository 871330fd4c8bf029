# gfm: `make demo` runs the pipeline end to end on data a PyPI package ships; `make test` runs the checks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Pinned so pip takes the builds that lie on disk instead of pulling a multi-GB download.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gfm demo

lint: $(STAMP)
	$(BIN)/ruff check $(wildcard gfm shards pretrain finetune demo export bench tests)
	$(BIN)/mypy
	$(BIN)/lint-imports

# two workers share the two cores (tests/conftest.py: one thread each); a file's tests stay on one worker,
# so the fixtures they share are built once
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

test-fast: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python -m bench.shards
	$(BIN)/python -m bench.loader
	$(BIN)/python -m bench.model
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.finetune
	$(BIN)/python -m bench.predict
	$(BIN)/python -m bench.predict_pixel

clean:
	rm -rf $(VENV) demo_out .pytest_cache .mypy_cache .ruff_cache
