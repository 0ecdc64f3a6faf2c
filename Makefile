# Two commands on a fresh machine:  `make demo` (main job on the embedded local Ray)  and  `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines pin the CPU build of torch so nothing pulls a CUDA wheel; GPU users: `make install TORCH=cuda`.
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
CONSTRAINTS := requirements/constraints-$(TORCH).txt
STAMP := $(VENV)/.installed-$(TORCH)
export RAY_USAGE_STATS_ENABLED ?= 0
# Two pytest-xdist workers, one test module each at a time (tests/conftest.py says why and in which order): on 2
# cores the suite is CPU-bound beyond that.
TEST_WORKERS ?= 2
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/medmae/torch_extensions

.PHONY: install demo demo-data test lint format bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
ifeq ($(TORCH),cpu)
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
endif
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev,demo]"
	touch $@

install: $(STAMP)

# The sample data: the real ICBM152 T1 template that nilearn ships (offline), converted to WebDataset shards.
# It lives at the absolute path configs/*_debug.yaml name (~/.cache/medmae/sample_wds), not in the checkout:
# `ray job submit --working-dir .` uploads the checkout without what .gitignore hides, so a path inside it would
# not resolve in the job, while this one resolves for every process of this user on this machine.
SAMPLE := $(HOME)/.cache/medmae/sample
SAMPLE_WDS := $(HOME)/.cache/medmae/sample_wds

$(SAMPLE)/dataset.json: | $(STAMP)
	$(BIN)/python tools/sample_data.py $(SAMPLE)

$(SAMPLE_WDS)/manifest.json: $(SAMPLE)/dataset.json
	$(BIN)/python tools/to_wds.py $(SAMPLE)/dataset.json $(SAMPLE_WDS) --format wds --preset mri \
		--spacing 2 2 2 --shard-size-mb 4

demo-data: $(SAMPLE_WDS)/manifest.json

demo: $(STAMP) demo-data
	$(BIN)/python launch/pretrain.py --config configs/pretrain_debug.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# The pre-registered label-efficiency study (README "See the method work", docs/study/PROTOCOL.md): MAE vs scratch on
# real anatomy, ~15 min on 2 CPUs; re-running resumes. Report: runs/study/summary.md (STUDY_ARGS="--publish
# docs/study" copies it to docs/); STUDY_ARGS="--smoke" runs every stage on a tiny budget (~2.5 min).
.PHONY: study
study: $(STAMP)
	$(BIN)/python tools/study.py $(STUDY_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/bench_model.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
