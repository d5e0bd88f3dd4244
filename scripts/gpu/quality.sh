# One GPU call per reference model ([5]): bash scripts/gpu/quality.sh PRESET NAME [TRAIN_SECONDS]
# Trains the reference preset again (the [4] checkpoints are too large to come back from a GPU call),
# with a shorter time budget, then runs `molae bench quality` on it. The device's git metadata can lag the
# working tree it receives: pass COMMIT=<local HEAD> in the command. Report, locally:
#   python -m molae.cli bench quality-report OUT1/quality-*.json ... --out results
source scripts/gpu/common.sh
PRESET=$1; NAME=$2; BUDGET=${3:-100}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
rm -rf /tmp/run /tmp/qwork
python3 -m molae.train --config $PRESET --data $DATA --out /tmp/run --time-budget $BUDGET --no-progress 2>&1 \
  | grep -E "^final|Error|error" || true
cp /tmp/run/summary.json $OUT/train-summary-$NAME.json
CMD="bash scripts/gpu/quality.sh $PRESET $NAME $BUDGET"
python3 -m molae.cli bench quality --model /tmp/run/model --name "$NAME" --data $DATA --device cuda \
  --workdir /tmp/qwork --json $OUT/quality-$NAME.json --eval-tokens 131072 --mobe-steps 300 \
  --commit "${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" --device-name "$GPU" \
  --date "$(date -u +%F)" --command "$CMD" 2>&1 | grep -v "Warning\|warn(\|it/s\]\|run/s\]" | tail -5
python3 -c "
import json, sys
q = json.load(open(sys.argv[1])); q['trained'] = json.load(open(sys.argv[2])); q['train_preset'] = sys.argv[3]
json.dump(q, open(sys.argv[1], 'w'), indent=2)" $OUT/quality-$NAME.json $OUT/train-summary-$NAME.json $PRESET
