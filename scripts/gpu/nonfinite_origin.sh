# [11] Where the DeepSeek-V3-style preset's first non-finite gradient arises, in detail:
#   COMMIT=<sha> [SET="KEY=VALUE ..."] bash scripts/gpu/nonfinite_origin.sh [STEPS]   (default 4000)
# Trains ref-deepseek-v3 as nonfinite.sh does (same seed, data and schedule for STEPS) until the trainer has logged
# its first skipped step's nonfinite_origin (metrics.locate_nonfinite, with the backward_trail of gradient
# magnitudes), then stops it: OUT/origin.json (that log line), OUT/origin-train.log.
source scripts/gpu/common.sh
STEPS=${1:-4000}
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
rm -rf /tmp/nfo
python3 -m molae.train --config ref-deepseek-v3 --data $DATA --out /tmp/nfo --steps $STEPS --set log_every=50 \
  --set eval_every=$STEPS --set ckpt_every=$STEPS "${SETS[@]}" --no-progress > $OUT/origin-train.log 2>&1 &
pid=$!
until grep -q nonfinite_origin /tmp/nfo/log.jsonl 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 2; done
kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
grep nonfinite_origin /tmp/nfo/log.jsonl | head -1 > $OUT/origin.json || true
grep -v "Warning\|warn(" $OUT/origin-train.log | tail -3 | cut -c1-300
python3 -m json.tool $OUT/origin.json
