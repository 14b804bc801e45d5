#!/usr/bin/env bash
# Learning curves on the CPU: the smoke recipe (recipes/smoke_cpu.yaml: tiny warm-started policy,
# real SLAKE + VQA-RAD parquet) trained for STEPS steps (default 120) as its own run
# (experiment NAME, default curve_cpu, under $OUT/runs/NAME: checkpoints, metrics, rollout and
# validation JSONL), then each stream's reward, IoU, accuracy, format rate and keep ratio over the
# steps with a moving average (vitos_verl.eval.curve) in $OUT/runs/NAME/curve.png.
# Not part of CI: `make curve` runs it (after the set-up, data and warm start of `make demo`);
# at 10-17 s a step on 2 cores, 120 steps take about 20-35 minutes plus start-up and validations.
# A second run resumes from the last checkpoint: raise STEPS to train on.
#
# Environment: OUT (default ./outputs), PY (default .venv/bin/python), STEPS, NAME,
# WINDOW (moving-average window in steps, default 10), TEST_FREQ (validate every N steps, default 25).
# Extra arguments are hydra overrides for the training run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/outputs}
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-120}
NAME=${NAME:-curve_cpu}
WINDOW=${WINDOW:-10}
TEST_FREQ=${TEST_FREQ:-25}
VITOS_OUTPUTS=$OUT RECIPE=smoke_cpu PYTHON=$PY bash launch/dualstream.sh \
  trainer.experiment_name="$NAME" trainer.total_training_steps="$STEPS" trainer.save_freq=50 \
  trainer.test_freq="$TEST_FREQ" "$@"
"$PY" -m vitos_verl.eval.curve "$OUT/runs/$NAME" --out "$OUT/runs/$NAME/curve.png" --window "$WINDOW"
