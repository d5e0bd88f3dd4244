# [10] One scratch reference per stretch of GPU time (what scripts/gpu/quality.sh did for [5], with [10]'s longer
# training, intervals and order), a background job collected across calls:
#   COMMIT=<sha> bash scripts/gpu/bg.sh start NAME bash scripts/gpu/scratch_reference.sh PRESET NAME [LENGTH]
#   WAIT=540 bash scripts/gpu/bg.sh wait NAME            (later calls, while the machine stays warm)
# Trains the reference preset for LENGTH: seconds (default 560: about 250M tokens at the [4] presets' speed) or
# NSTEPS followed by "steps" (7630steps: 250M tokens at the presets' 32,768 a step), the schedule fitted to it (the
# checkpoints are too large to come back from the GPU machine), then, in priority order, each landing in $OUT as
# it finishes: `molae analyze` of it; `molae bench quality` with 1,048,576 held-out tokens and intervals, the
# main methods healed and not at 50% and 25% (calibration seed 0); seed 1 for the best MoLAE variants and SVD;
# the 75% and 35% points; last, quality along training ([10] part 3): the run is exported at a quarter and a half
# of its steps too, and the unhealed main methods convert each export at 50% and 25%
# (quality-NAME-quarter.json, quality-NAME-half.json). SET="KEY=VALUE ..." adds training overrides (e.g.
# SET=compile_mode=reduce-overhead, once profile_train.sh has shown it faster with the same loss); METHODS replaces
# the main methods, PARTS=main,seed1,75-35,along picks the parts (default all). Report, locally:
#   python -m molae.cli bench quality-report FETCHED/quality-NAME*.json --out results/...
source scripts/gpu/common.sh
set +e  # a background job: a failed step should not stop the ones after it
PRESET=$1; NAME=$2; BUDGET=${3:-560}
case $BUDGET in *steps) LENGTH=(--steps ${BUDGET%steps});; *) LENGTH=(--time-budget $BUDGET);; esac
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
W=/tmp/q-$NAME; rm -rf $W; mkdir -p $W
python3 -m molae.train --config $PRESET --data $DATA --out $W/run "${LENGTH[@]}" "${SETS[@]}" --export-at 0.25,0.5 \
  --no-progress 2>&1 \
  | grep -E "^final|Error|error"
cp $W/run/summary.json $OUT/train-summary-$NAME.json
cp $W/run/log.jsonl $OUT/train-log-$NAME.jsonl  # its skipped steps and where their non-finite gradients arose ([11])
analyze_to $NAME $W/run/model
CMD="COMMIT=${COMMIT:-unknown}${SET:+ SET=\"$SET\"}${METHODS:+ METHODS=$METHODS}${PARTS:+ PARTS=$PARTS} bash scripts/gpu/bg.sh start $NAME bash scripts/gpu/scratch_reference.sh $PRESET $NAME $BUDGET"
q() { quality_1m "$NAME$1" ${5:-$W/run/model} $W/w$1 "$2" "$3" "$4" "$CMD"; }  # SUFFIX SEED METHODS BUDGETS [MODEL]
part() { [[ ",${PARTS:-main,seed1,75-35,along}," == *",$1,"* ]]; }  # PARTS: which of them, in this order
part main && q "" 0 ${METHODS:-$MAIN_METHODS} 0.5,0.25
part seed1 && q -seed1 1 molae-alloc,molae-alloc-g,svd 0.5,0.25
part 75-35 && q -75-35 0 molae-alloc,molae-alloc-sqrt,molae-alloc-g,molae-alloc-g+heal,molae-alloc-sqrt+heal,svd,svd+heal,d2moe,mobe,mobe-lowrank,mobe-lowrank+heal,hcsmoe,prune-reap,prune-reap+heal 0.75,0.35
EXPORTS=($(ls -d $W/run/model-step* | sort -V))  # the quarter and the half
ALONG=molae-alloc,molae-alloc-g,molae-alloc-sqrt,svd,mobe-lowrank,d2moe,hcsmoe,prune-reap  # [10] part 3, unhealed
part along && q -quarter 0 $ALONG 0.5,0.25 ${EXPORTS[0]}
part along && q -half 0 $ALONG 0.5,0.25 ${EXPORTS[1]}
echo "scratch_reference.sh done"
