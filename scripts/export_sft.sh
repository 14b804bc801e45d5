#!/usr/bin/env bash
# The Hugging Face model of a verl SFT run's last step (or of STEP), with the processor files
# (pixel budget, chat template) of the base checkpoint it started from, written to DEST atomically.
#   bash scripts/export_sft.sh SFT_RUN_DIR BASE_MODEL_DIR DEST [STEP]
set -euo pipefail
RUN=$1 BASE=$2 DEST=$3 STEP=${4:-}
if [[ -n $STEP ]]; then
  HF=$RUN/global_step_$STEP/huggingface
  [[ -d $HF ]] || { echo "export_sft.sh: no checkpoint $HF" >&2; exit 1; }
else
  HF=$(ls -d "$RUN"/global_step_*/huggingface | sort -V | tail -1)
fi
rm -rf "$DEST.tmp"; cp -r "$HF" "$DEST.tmp"
for f in processor_config.json preprocessor_config.json chat_template.jinja vitos_tiny.json; do
  [[ -f $BASE/$f ]] && cp "$BASE/$f" "$DEST.tmp/"
done
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
echo "exported $DEST from $HF"
