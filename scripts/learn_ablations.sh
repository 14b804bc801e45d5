#!/usr/bin/env bash
# The paper's ablations in miniature (`make learn-ablations`, not in CI): make learn's task, data,
# warm start and RL budget (scripts/learn_cpu.sh, seed SEED), one RL run per variant:
#   vitos        recipes/learn_cpu.yaml as it is (make learn's run: reused when it is there)
#   no_feedback  vitos.w_fb=0 (no cross-feedback)
#   joint        vitos.order=joint (one summed loss instead of two updates in sequence)
#   no_prune     vitos.prune_mode=none (reasoning on the full image)
#   crop         vitos.prune_mode=crop (reasoning on the crop of the box)
# then the evaluation harness (python -m vitos_verl.eval, recipes/eval_cpu.yaml) on each trained
# policy over the task's validation questions: one pass on the full image, two-pass ViToS, two-pass
# crop, the ground-truth box (oracle) and random cells at ViToS's keep ratio; then
# vitos_verl.eval.ablations writes $OUT/ablations/seed<SEED>/ablations.{md,json,png}.
#
# Environment: as scripts/learn_cpu.sh (OUT, PY, SEED, STEPS, SFT_STEPS, ...); VARIANTS (default
# all five, space-separated); EVAL_LIMIT (validation questions evaluated, default all).
# Each part resumes: a finished run or evaluation is not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-outputs}")
PY=${PY:-.venv/bin/python}
SEED=${SEED:-0}
VARIANTS=${VARIANTS:-vitos no_feedback joint no_prune crop}
DEST=$OUT/ablations/seed$SEED
DATA=$OUT/data/sparse_evidence-seed$SEED

overrides() {  # variant -> the RL run's hydra overrides
  case $1 in
    vitos) ;;
    no_feedback) echo vitos.w_fb=0 ;;
    joint) echo vitos.order=joint ;;
    no_prune) echo vitos.prune_mode=none ;;
    crop) echo vitos.prune_mode=crop ;;
    *) echo "learn_ablations: unknown variant $1 (vitos no_feedback joint no_prune crop)" >&2; exit 2 ;;
  esac
}

ARGS=()
for v in $VARIANTS; do
  overrides "$v" >/dev/null  # refuse an unknown variant before any run
  name=learn_cpu-seed$SEED
  [[ $v == vitos ]] || name=learn_abl-$v-seed$SEED
  # shellcheck disable=SC2046
  OUT=$OUT PY=$PY SEED=$SEED NAME=$name CONTROL=0 bash scripts/learn_cpu.sh $(overrides "$v")
  ckpt=$OUT/runs/$name/ckpt
  step=$(cat "$ckpt/latest_checkpointed_iteration.txt")
  VITOS_OUTPUTS=$DEST "$PY" -m vitos_verl.eval --config-path "$PWD/recipes" --config-name eval_cpu \
    model.path="$ckpt/global_step_$step" model.tag="$v" '~benchmarks' \
    "+benchmarks={sparse_evidence: {parquet: $DATA/val.parquet}}" \
    'methods=[full,vitos,crop,oracle,random]' ${EVAL_LIMIT:+limit=$EVAL_LIMIT}
  ARGS+=("$v=$OUT/runs/$name")
done
"$PY" -m vitos_verl.eval.ablations --eval "$DEST/eval" --out "$DEST" "${ARGS[@]}"
