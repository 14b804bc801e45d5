#!/usr/bin/env bash
# The Hugging Face model of a verl SFT run's last step, with the processor files (pixel budget,
# chat template) of the base checkpoint it started from, written to DEST atomically.
#   bash scripts/export_sft.sh SFT_RUN_DIR BASE_MODEL_DIR DEST
set -euo pipefail
RUN=$1 BASE=$2 DEST=$3
HF=$(ls -d "$RUN"/global_step_*/huggingface | sort -V | tail -1)
rm -rf "$DEST.tmp"; cp -r "$HF" "$DEST.tmp"
for f in processor_config.json preprocessor_config.json chat_template.jinja vitos_tiny.json; do
  [[ -f $BASE/$f ]] && cp "$BASE/$f" "$DEST.tmp/"
done
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
echo "exported $DEST from $HF"
