# [8] quality of the layer-by-layer pipeline against the in-memory path it replaces, one GPU call:
#   COMMIT=<sha> OLD=<sha of the old code> bash scripts/gpu/pipeline_quality.sh [TRAIN_SECONDS [VARIANTS [PRESET]]]
# Trains a reference of [4] (PRESET: ref-qwen2-moe by default, ref-mixtral, ref-deepseek-v3) for TRAIN_SECONDS,
# then converts it at 50% and 25% of the routed-expert parameters (calibrated, --budget, gate,up,down, 65,536
# calibration tokens) with the old code (carried in .old/: `git archive $OLD molae | tar -x -C .old`), the new
# pipeline with its default carry (original outputs) and with converted ones, each with and without layer-wise
# healing, and the new conversion healed by the whole-model KL pass (molae heal); scores all on the same held-out
# windows. VARIANTS (names separated by ;) runs a subset. JSON to $OUT/pipeline_quality.json.
source scripts/gpu/common.sh
BUDGET=${1:-150}
PRESET=${3:-ref-qwen2-moe}
VARIANTS=${2:-}  # variant names separated by ; (scripts/gpu/pipeline_quality.py), default all
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
RUN=/tmp/run-$PRESET PQ=/tmp/pq-$PRESET  # per preset: two presets may run side by side
rm -rf $RUN $PQ
python3 -m molae.train --config $PRESET --data $DATA --out $RUN --time-budget $BUDGET --no-progress 2>&1 \
  | grep -E "^final|Error|error" || true
cp $RUN/summary.json $OUT/train-summary.json
python3 scripts/gpu/pipeline_quality.py $RUN/model $DATA $PQ $OUT/pipeline_quality.json \
  --commit "${COMMIT:-unknown}" --old "${OLD:-unknown}" --device-name "$GPU" \
  --variants "$VARIANTS" \
  --command "COMMIT=${COMMIT:-unknown} OLD=${OLD:-unknown} bash scripts/gpu/pipeline_quality.sh $BUDGET \"$VARIANTS\" $PRESET" 2>&1 \
  | grep -v "it/s\]\|s/it\]\|layer/s\]\|Warning\|warn(" | tail -30
