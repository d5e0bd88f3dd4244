# Runs scripts/gpu/pipeline_quality.sh for several presets side by side in the background (scripts/gpu/bg.sh),
# waits up to WAIT seconds, and packs what each has written so far as $OUT/<preset>.tgz (bg.sh). Call it again
# (within the machine's warm window) to wait on runs already started: it starts only presets not yet started.
#   COMMIT=<sha> OLD=<sha> WAIT=540 bash scripts/gpu/pipeline_quality_bg.sh TRAIN_SECONDS "VARIANTS" PRESET...
source scripts/gpu/common.sh
SECONDS_=$1 VARIANTS=$2; shift 2
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
for p in "$@"; do bash scripts/gpu/bg.sh start $p bash scripts/gpu/pipeline_quality.sh $SECONDS_ "$VARIANTS" $p; done
bash scripts/gpu/bg.sh wait "$@"
