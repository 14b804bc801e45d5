#!/usr/bin/env bash
# Warm start of the CPU smoke policy (docs/design.md section 10): the tiny random Qwen2.5-VL never emits a
# parseable box or answer, so GRPO would see only zero rewards. This builds the tiny checkpoint at
# the smoke pixel budget, the SFT parquet of both stream templates from the real training split,
# runs verl's SFT trainer on the CPU platform (torchrun, 1 process) and exports the HF model the
# smoke recipe trains. Cached: nothing runs when the exported model exists (FORCE=1 redoes it).
#   bash scripts/warmstart_cpu.sh [hydra overrides for verl.trainer.sft_trainer...]
# SFT_ARGS: options of python -m vitos_verl.data.sft (e.g. "--box-format norm1" for a run with
# vitos.box_format=norm1: the targets' boxes in the format the run's prompt asks for).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=$(realpath -m "${OUT:-outputs}")
MAX_PIXELS=${MAX_PIXELS:-78400}
ROWS=${SFT_ROWS:-600}
BASE=$OUT/models/tiny-qwen2.5-vl-smoke
DEST=$OUT/models/tiny-qwen2.5-vl-sft
RUN=$OUT/runs/sft_warmstart_cpu
if [[ -f $DEST/model.safetensors && ${FORCE:-0} != 1 ]]; then
  echo "warmstart: cached $DEST (FORCE=1 to redo)"; exit 0
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VERL_PLATFORM=cpu VERL_ENGINE_DEVICE=cuda VERL_ENGINE_VENDOR=nvidia
export VERL_FILE_LOGGER_PATH=$RUN/metrics.jsonl
"$PY" -m vitos_verl.models.tiny --out "$BASE" --max-pixels "$MAX_PIXELS"
# shellcheck disable=SC2086
"$PY" -m vitos_verl.data.sft --out "$OUT/data/sft/train.parquet" --max-pixels "$MAX_PIXELS" --limit "$ROWS" \
  --inputs "$OUT/data/slake/train.parquet" "$OUT/data/vqa_rad/train.parquet" ${SFT_ARGS:-}
rm -rf "$RUN"; mkdir -p "$RUN"
"$(dirname "$PY")/torchrun" --standalone --nproc_per_node 1 -m vitos_verl.trainer.sft_warmstart \
  --config-path "$PWD/recipes" --config-name sft_warmstart_cpu \
  outputs_dir="$OUT" model.path="$BASE" "$@"
bash scripts/export_sft.sh "$RUN" "$BASE" "$DEST"
