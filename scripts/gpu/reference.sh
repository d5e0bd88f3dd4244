# One GPU call per reference model: bash scripts/gpu/reference.sh PRESET [SECONDS]
# The corpus is re-collected and tokenized with the recorded tokenizer (results/data/tokenizer);
# the bigram floor is counted on the CPU while the GPU trains.
source scripts/gpu/common.sh
PRESET=$1; BUDGET=${2:-400}
nvidia-smi --query-gpu=name --format=csv,noheader
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1  # a warm machine keeps it
rm -rf /tmp/run
cp $DATA/manifest.json $OUT/manifest.json
python3 -m molae.cli data bigram $DATA --json $OUT/bigram.json > $OUT/bigram.log 2>&1 &
python3 -m molae.train --config $PRESET --data $DATA --out /tmp/run --time-budget $BUDGET --no-progress 2>&1 \
  | grep -v "Warning\|warn(" | tee $OUT/train.log | grep -v "^step .* loss .* lr" || true
cp /tmp/run/summary.json /tmp/run/log.jsonl /tmp/run/train_config.json $OUT/
wait
cat $OUT/bigram.log
du -sh /tmp/run/model
