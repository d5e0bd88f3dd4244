# [10] The upcycled reference, one background job (start it with scripts/gpu/bg.sh, collect it across calls):
#   COMMIT=<sha> bash scripts/gpu/bg.sh start upcycled bash scripts/gpu/upcycled.sh [DENSE_S [MOE_S]]
# 1. `dense-qwen2` trained DENSE_S seconds; 2. `ref-qwen2-upcycled --upcycle-from` it, MOE_S seconds, exported
# also at a quarter and a half of its steps; 3. the same MoE preset from scratch for the same steps (in the
# background, beside what follows); 4. `molae bench quality` on the upcycled model (1,048,576 held-out tokens,
# intervals, next-line exact match): the main methods, healed and not, at 50% and 25%, calibration seed 0;
# 5. `molae analyze` of it, of the scratch twin and of the quarter export; 6. seed 1 for the best MoLAE variants
# and SVD; 7. the unhealed main methods at the quarter and half exports; 8. the 75% and 35% points. Everything lands in $OUT as it finishes (priority order).
source scripts/gpu/common.sh
set +e  # a background job: a failed step should not stop the ones after it
DENSE_S=${1:-150} MOE_S=${2:-240}
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
W=/tmp/upc; rm -rf $W; mkdir -p $W
train() { python3 -m molae.train --data $DATA --no-progress "$@" 2>&1 | grep -E "^final|Error|error" || true; }
train --config dense-qwen2 --out $W/dense --time-budget $DENSE_S
cp $W/dense/summary.json $OUT/train-summary-dense.json
train --config ref-qwen2-upcycled --upcycle-from $W/dense/model --out $W/up --time-budget $MOE_S --export-at 0.25,0.5
cp $W/up/summary.json $OUT/train-summary-upcycled.json
STEPS=$(python3 -c "import json; print(json.load(open('$W/up/summary.json'))['config']['steps'])")
(train --config ref-qwen2-upcycled --set upcycle=null --out $W/scratch --steps $STEPS \
   && cp $W/scratch/summary.json $OUT/train-summary-scratch.json) > $OUT/scratch.log 2>&1 &
SCRATCH=$!
CMD="COMMIT=${COMMIT:-unknown} bash scripts/gpu/bg.sh start upcycled bash scripts/gpu/upcycled.sh $DENSE_S $MOE_S"
q() { quality_1m "$1" "$2" $W/q-$1 "$3" "$4" "${5:-0.5,0.25}" "$CMD"; }  # NAME MODEL SEED METHODS [BUDGETS]
q upcycled $W/up/model 0 $MAIN_METHODS
analyze_to upcycled $W/up/model
Q=$(ls -d $W/up/model-step* | sort -V | head -1); H=$(ls -d $W/up/model-step* | sort -V | tail -1)
wait $SCRATCH || true  # analyses are cheap and [10] part 7 needs the scratch twin's: before the long runs
analyze_to scratch $W/scratch/model
analyze_to upcycled-quarter $Q
UNHEALED=molae-alloc,molae-alloc-g,svd,d2moe,hcsmoe,prune-reap
q upcycled-seed1 $W/up/model 1 molae-alloc,molae-alloc-g,svd
q upcycled-quarter $Q 0 $UNHEALED
q upcycled-half $H 0 $UNHEALED
q upcycled-75-35 $W/up/model 0 $UNHEALED,svd+heal,molae-alloc-g+heal 0.75,0.35
echo "upcycled.sh done"
