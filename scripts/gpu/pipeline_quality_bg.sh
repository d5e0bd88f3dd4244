# Runs scripts/gpu/pipeline_quality.sh for several presets side by side in the background (setsid: they outlive
# the call), waits up to WAIT seconds, and copies what each has written so far to $OUT/<preset>/. Call it again
# (within the machine's warm window) to wait on runs already started: it starts only presets not yet started.
#   COMMIT=<sha> OLD=<sha> WAIT=540 bash scripts/gpu/pipeline_quality_bg.sh TRAIN_SECONDS "VARIANTS" PRESET...
source scripts/gpu/common.sh
SECONDS_=$1 VARIANTS=$2; shift 2
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
for p in "$@"; do
  [ -d /tmp/bg/$p ] && continue
  mkdir -p /tmp/bg/$p
  OUT=/tmp/bg/$p setsid nohup bash -c "bash scripts/gpu/pipeline_quality.sh $SECONDS_ \"$VARIANTS\" $p; echo \$? > /tmp/bg/$p/rc" \
    > /tmp/bg/$p/log 2>&1 < /dev/null &
done
end=$((SECONDS + ${WAIT:-540}))
while [ $SECONDS -lt $end ]; do
  done_=1; for p in "$@"; do [ -f /tmp/bg/$p/rc ] || done_=0; done
  [ $done_ = 1 ] && break; sleep 5
done
for p in "$@"; do mkdir -p $OUT/$p; cp /tmp/bg/$p/* $OUT/$p/ 2>/dev/null || true; echo "$p: rc $(cat /tmp/bg/$p/rc 2>/dev/null || echo running)"; tail -5 /tmp/bg/$p/log; done
