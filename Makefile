# vitos-verl: one-command set-up, main job and tests on a CPU machine.
#   make demo   set everything up, prepare the real data, warm-start the tiny policy, train the
#               CPU smoke recipe (both streams, a checkpoint, two-pass validation), print a summary
#   make test   set everything up, run the test suite (what CI runs)
#   make eval   evaluate the warm-started tiny model and the smoke run's last checkpoint on the
#               SLAKE and VQA-RAD test splits, two-pass and every baseline; tables, plots, HTML
#   make curve  train the smoke recipe STEPS steps (default 120) as its own run and plot each
#               stream's reward, IoU, accuracy, format rate and keep ratio (not in CI; ~30 min)
#   make learn  the learning check: the controlled sparse-evidence task, a short warm start, the
#               dual-stream trainer and its permuted-reward control; a report whose last line is
#               "learn: val_acc=.. val_iou=.. grounding_reward=.. reasoning_reward=.." (not in CI)
#   make learn-ablations  the paper's ablations in miniature on make learn's task: no cross-feedback,
#               one summed loss, no pruning, crop, each trained and evaluated (full, ViToS, crop,
#               oracle, random cells); a table and a plot (not in CI; ~100 min)
#   make two-stage  the two-stage schedule on the CPU (scripts/two_stage_cpu.sh): the smoke recipe
#               updating the grounding stream only for STAGE_STEPS steps, its export, then the
#               reasoning stream only for STAGE_STEPS steps from the export, and the check that
#               stage 2 started from stage 1's weights (not in CI)
#   make two-node  two Ray nodes on this machine (token auth on): FSDP over two ranks, two vLLM
#               replicas, a checkpoint, the worker node killed, a resume (not in CI; ~15 min)
#   make gpu-smoke  the first run on a GPU host (scripts/gpu_smoke.sh, one GPU, no set-up step):
#               versions and attention path, the parity tests, gpu1_small for 3 steps + a resume,
#               the 7B-shape rollout and evaluation benchmarks; SMOKE_ARGS="--only train" / "--dry-run"
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

.PHONY: setup data tiny warmstart train summary demo eval curve learn learn-ablations two-stage two-node pruned-check test bench gpu-smoke lint clean

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

# evaluation (vitos_verl/eval, recipes/eval_cpu.yaml): both models into one report under $(OUT)/eval;
# resumable (a rerun evaluates only what is missing). EVAL_ARGS: hydra overrides, e.g. limit=50
eval: warmstart
	VITOS_OUTPUTS=$(OUT) $(PY) -m vitos_verl.eval --config-path $(CURDIR)/recipes --config-name eval_cpu \
		model.path=$(OUT)/models/tiny-qwen2.5-vl-sft model.tag=tiny-warmstart $(EVAL_ARGS)
	@if [[ -f $(OUT)/runs/$(RECIPE)/ckpt/latest_checkpointed_iteration.txt ]]; then \
		VITOS_OUTPUTS=$(OUT) $(PY) -m vitos_verl.eval --config-path $(CURDIR)/recipes --config-name eval_cpu \
			model.path=$(OUT)/runs/$(RECIPE)/ckpt $(EVAL_ARGS); \
	else echo "eval: no $(RECIPE) checkpoint yet (make train); evaluated the warm start only"; fi

# learning curves: scripts/curve_cpu.sh (STEPS, NAME, WINDOW; writes $(OUT)/runs/curve_cpu/curve.png)
STEPS ?= 120
curve: warmstart
	OUT=$(OUT) PY=$(PY) STEPS=$(STEPS) bash scripts/curve_cpu.sh $(TRAIN_ARGS)

# the learning check: scripts/learn_cpu.sh (SEED, STEPS, SFT_STEPS; CONTROL=0 skips the control run)
SEED ?= 0
learn: setup
	OUT=$(OUT) PY=$(PY) SEED=$(SEED) CONTROL=$${CONTROL:-1} bash scripts/learn_cpu.sh $(TRAIN_ARGS)

# the paper's ablations in miniature on make learn's task (scripts/learn_ablations.sh; not in CI):
# five RL runs of make learn's length (about 18 minutes each on 2 cores), the evaluation harness on
# each, the table in $(OUT)/ablations/seed$(SEED)/ablations.md. VARIANTS="no_feedback joint" runs some
learn-ablations: setup
	OUT=$(OUT) PY=$(PY) SEED=$(SEED) bash scripts/learn_ablations.sh

# the two-stage schedule (recipes/lingshu7b_stage{1,2}.yaml) on the smoke recipe: scripts/two_stage_cpu.sh
# (STAGE_STEPS per stage; FORCE=1 starts again); runs under $(OUT)/runs/two_stage_cpu_stage{1,2}
STAGE_STEPS ?= 2
two-stage: warmstart
	OUT=$(OUT) PY=$(PY) STEPS=$(STAGE_STEPS) bash scripts/two_stage_cpu.sh $(TRAIN_ARGS)

pruned-check: data tiny
	$(PY) -m vitos_verl.eval.pruned_check --model $(OUT)/models/tiny-qwen2.5-vl \
		--data $(OUT)/data/slake/test.parquet --num 8 --max-new-tokens 4

test: setup
	$(PY) -m pytest -q

# two Ray nodes on this machine (tests/test_two_node.py; not in CI, about 15 min): FSDP over two
# ranks on two nodes, two vLLM replicas, a checkpoint, the worker node killed, a resume; figures in
# the test's output and its runs folder (two_node.json)
two-node: warmstart
	VITOS_OUTPUTS=$(OUT) $(PY) -m pytest -q -s -m two_node tests/test_two_node.py

bench: data
	$(PY) bench/rollout_pruning.py $(BENCH_ARGS)

# on a GPU host, in its GPU environment (Dockerfile): no CPU set-up; summary in $(OUT)/gpu_smoke/summary.txt
gpu-smoke:
	OUT=$(OUT)/gpu_smoke VITOS_OUTPUTS=$(OUT) bash scripts/gpu_smoke.sh $(SMOKE_ARGS)

lint: setup
	$(VENV)/bin/ruff check vitos_verl data_prep tests bench

clean:
	rm -rf $(OUT) .cache
