#!/usr/bin/env bash
# The learning check on the CPU (`make learn`): does dual-stream GRPO make a policy better?
#   1. the controlled sparse-evidence task (data_prep/sparse_evidence.py; seed SEED);
#   2. a random tiny Qwen2.5-VL at the task's pixel budget (vitos_verl.models.tiny);
#   3. a short supervised warm start on the task through verl's SFT trainer (SFT_STEPS steps,
#      well below the ceiling: the RL run has room to learn; its validation is the run's step 0);
#   4. the dual-stream trainer (recipes/learn_cpu.yaml) through the same entrypoint as `make demo`,
#      validating before training and every TEST_FREQ steps;
#   5. with CONTROL=1, the same run with each step's rewards permuted (vitos.shuffle_rewards);
#   6. the report: <run>/learn_report.{json,md}, <run>/learn_curve.png; the last line reads
#      learn: val_acc=<start>-><end> val_iou=<start>-><end> grounding_reward=<first10>-><last10> reasoning_reward=...
# Steps 1-3 are cached per seed (FORCE=1 redoes them); a rerun resumes the trainer's checkpoint.
#
# Environment: OUT (default ./outputs), PY (default .venv/bin/python), SEED (default 0),
# STEPS (RL steps, default: the recipe's), SFT_STEPS (default 250), N_TRAIN (default 2000),
# N_VAL (default 128), NAME (run name, default learn_cpu-seed<SEED>), CONTROL (0|1, default 0),
# SIZE (vitos_verl.models.tiny size, default learn), TASK_ARGS (options of data_prep.sparse_evidence,
# default "--position-cue 120 --object-cells 2 --distractor-cells 1": a bias field that puts each
# pixel's position into its colour and a disc larger than the squares, without which the learn
# policy does not localise the disc under supervision (docs/learning.md); the data folder is per
# seed: FORCE=1 after changing them).
# SFT_SAVE_FREQ (default: none) also keeps the warm start of every SFT_SAVE_FREQ-th step, as the
# cached warm start of a run with SFT_STEPS=<that step> (one long SFT, several starting points).
# SFT_PICK=<threshold> (e.g. 0.4) picks the warm start by what it measures: one SFT run of
# SFT_STEPS (default 400 then) keeping every SFT_SAVE_FREQ-th step (default 25), then
# vitos_verl.eval.warmstart_probe on N_PROBE (64) validation questions, sampled at temperature 1,
# on each kept step from SFT_PICK_FROM (default 100) up; the RL run starts from the first whose
# sampled box IoU and sampled answer accuracy (gt-box pruned image) both reach the threshold (the
# last one if none does). The probes and the pick: $OUT/models/learn-<size>-pick<threshold>-seed<SEED>.json.
# Extra arguments are hydra overrides of the RL run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-outputs}")
PY=${PY:-.venv/bin/python}
SEED=${SEED:-0}
if [[ -n ${SFT_PICK:-} ]]; then SFT_STEPS=${SFT_STEPS:-400} SFT_SAVE_FREQ=${SFT_SAVE_FREQ:-25}; fi
SFT_STEPS=${SFT_STEPS:-250}
N_TRAIN=${N_TRAIN:-2000}
N_VAL=${N_VAL:-128}
SIZE=${SIZE:-learn}
NAME=${NAME:-learn_cpu-seed$SEED}
MAX_PIXELS=50176  # recipes/learn_cpu.yaml's data.max_pixels: 224 x 224, not resized
DATA=$OUT/data/sparse_evidence-seed$SEED
BASE=$OUT/models/learn-$SIZE-base-seed$SEED
SFT=$OUT/models/learn-$SIZE-sft$SFT_STEPS-seed$SEED
SFT_RUN=$OUT/runs/sft_learn_cpu-seed$SEED
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VERL_PLATFORM=cpu VERL_ENGINE_DEVICE=cuda VERL_ENGINE_VENDOR=nvidia
T0=$(date +%s)
stamp() { echo "learn_cpu: $* ($(( $(date +%s) - T0 )) s)"; }

if [[ ! -f $DATA/summary.json || ${FORCE:-0} == 1 ]]; then
  # shellcheck disable=SC2086
  "$PY" -m data_prep.sparse_evidence --out "$DATA" --seed "$SEED" --n-train "$N_TRAIN" --n-val "$N_VAL" \
    ${TASK_ARGS:---position-cue 120 --object-cells 2 --distractor-cells 1}
fi
stamp "data $DATA"

if [[ ! -f $SFT/model.safetensors || ${FORCE:-0} == 1 ]]; then
  "$PY" -m vitos_verl.models.tiny --size "$SIZE" --seed "$SEED" --out "$BASE" --max-pixels "$MAX_PIXELS"
  "$PY" -m vitos_verl.data.sft --out "$DATA/sft.parquet" --max-pixels "$MAX_PIXELS" --inputs "$DATA/train.parquet"
  rm -rf "$SFT_RUN"; mkdir -p "$SFT_RUN"
  VERL_FILE_LOGGER_PATH=$SFT_RUN/metrics.jsonl "$(dirname "$PY")/torchrun" --standalone --nproc_per_node 1 \
    -m vitos_verl.trainer.sft_warmstart --config-path "$PWD/recipes" --config-name sft_warmstart_cpu \
    outputs_dir="$OUT" model.path="$BASE" data.train_files="$DATA/sft.parquet" data.train_batch_size=16 \
    data.micro_batch_size_per_gpu=16 data.max_length=256 optim.lr=1e-3 model.enable_gradient_checkpointing=false \
    trainer.total_training_steps="$SFT_STEPS" ${SFT_SAVE_FREQ:+trainer.save_freq=$SFT_SAVE_FREQ} \
    trainer.experiment_name=sft_learn_cpu trainer.default_local_dir="$SFT_RUN" trainer.seed="$SEED"
  bash scripts/export_sft.sh "$SFT_RUN" "$BASE" "$SFT"
  if [[ -n ${SFT_SAVE_FREQ:-} ]]; then
    for ((s = SFT_SAVE_FREQ; s < SFT_STEPS; s += SFT_SAVE_FREQ)); do
      bash scripts/export_sft.sh "$SFT_RUN" "$BASE" "$OUT/models/learn-$SIZE-sft$s-seed$SEED" "$s"
    done
  fi
fi
if [[ -n ${SFT_PICK:-} ]]; then
  PICK=$OUT/models/learn-$SIZE-pick$SFT_PICK-seed$SEED.json
  if [[ ! -f $PICK || ${FORCE:-0} == 1 ]]; then
    cands=()
    for ((s = ${SFT_PICK_FROM:-100}; s <= SFT_STEPS; s += SFT_SAVE_FREQ)); do
      if [[ -f $OUT/models/learn-$SIZE-sft$s-seed$SEED/model.safetensors ]]; then cands+=("$OUT/models/learn-$SIZE-sft$s-seed$SEED"); fi
    done
    "$PY" -m vitos_verl.eval.warmstart_probe --pick "$SFT_PICK" --model "${cands[@]}" --data "$DATA/val.parquet" \
      --num "${N_PROBE:-64}" --seed "$SEED" --out "$PICK" > /dev/null
  fi
  SFT=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["picked"])' "$PICK")
fi
stamp "warm start $SFT"

run() {  # run name, extra overrides...
  local name=$1; shift
  VITOS_OUTPUTS=$OUT RECIPE=learn_cpu PYTHON=$PY bash launch/dualstream.sh \
    trainer.experiment_name="$name" actor_rollout_ref.model.path="$SFT" \
    data.train_files="[$DATA/train.parquet]" data.val_files="$DATA/val.parquet" data.seed="$SEED" \
    ${STEPS:+trainer.total_training_steps=$STEPS} "$@"
}
run "$NAME" "$@"
stamp "trained $OUT/runs/$NAME"
CONTROL_ARGS=()
if [[ ${CONTROL:-0} == 1 ]]; then
  run "$NAME-control" vitos.shuffle_rewards=true "$@"
  stamp "control $OUT/runs/$NAME-control"
  CONTROL_ARGS=(--control "$OUT/runs/$NAME-control")
fi
"$PY" -m vitos_verl.eval.learn_report "$OUT/runs/$NAME" "${CONTROL_ARGS[@]}"
