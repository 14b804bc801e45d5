# vitos-verl: one-command set-up, main job and tests on a CPU machine.
#   make demo   set everything up, prepare the real data, warm-start the tiny policy, train the
#               CPU smoke recipe (both streams, a checkpoint, two-pass validation), print a summary
#   make test   set everything up, run the test suite (what CI runs)
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
DATA ?= $(abspath $(CURDIR)/../shared/data)
OUT ?= $(CURDIR)/outputs

# Nothing writes to ~ and nothing reaches a model hub.
export HF_HOME := $(CURDIR)/.cache/hf
export VLLM_CACHE_ROOT := $(CURDIR)/.cache/vllm
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export VITOS_DATA := $(DATA)

RECIPE ?= smoke_cpu

.PHONY: setup data tiny warmstart train summary demo pruned-check test test-slow bench lint clean

setup:
	bash scripts/setup_cpu.sh

data: setup
	$(PY) -m data_prep.slake --src $(DATA)/slake --out $(OUT)/data/slake
	$(PY) -m data_prep.vqa_rad --src $(DATA)/vqa_rad --out $(OUT)/data/vqa_rad

tiny: setup
	$(PY) -m vitos_verl.models.tiny --out $(OUT)/models/tiny-qwen2.5-vl

# verl's SFT trainer on both stream templates; cached (FORCE=1 to redo)
warmstart: data
	OUT=$(OUT) PY=$(PY) bash scripts/warmstart_cpu.sh

# the dual-stream trainer through the Ray-job entrypoint (resumes from the last checkpoint)
train: warmstart
	VITOS_OUTPUTS=$(OUT) RECIPE=$(RECIPE) PYTHON=$(PY) bash launch/dualstream.sh $(TRAIN_ARGS)

summary:
	$(PY) -m vitos_verl.eval.summary $(OUT)/runs/$(RECIPE)

demo: train
	$(PY) -m vitos_verl.eval.summary $(OUT)/runs/$(RECIPE)

pruned-check: data tiny
	$(PY) -m vitos_verl.eval.pruned_check --model $(OUT)/models/tiny-qwen2.5-vl \
		--data $(OUT)/data/slake/test.parquet --num 8 --max-new-tokens 4

test: setup
	$(PY) -m pytest -q

bench: data
	$(PY) bench/rollout_pruning.py $(BENCH_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check vitos_verl data_prep tests bench

clean:
	rm -rf $(OUT) .cache
