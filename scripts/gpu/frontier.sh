# [11] The pretraining frontier (molae/frontier.py's plan), one background job collected across GPU calls:
#   COMMIT=<sha> bash scripts/gpu/bg.sh start frontier bash scripts/gpu/frontier.sh [STEPS [SHAPES...]]
#   WAIT=540 bash scripts/gpu/bg.sh wait frontier        (later calls, while the machine stays warm; one frontier.tgz)
# FROM=DIR (e.g. results/frontier/runs, which travels with the checkout): runs finished in an earlier session are
# copied in first and so skipped; only the plan's other variants train.
# Each variant in plan order (standard MoEs first, so a partial job still gives a fit), STEPS steps (default the
# presets': 2500 of 128 x 512 tokens, 164M); after each, its summary.json and log.jsonl land in
# $OUT/runs/SHAPE/VARIANT (the checkpoints stay on the machine). A finished run is skipped if the job is started
# again on the same machine. Then, here: python -m molae.experiments frontier --runs FETCHED/runs ...
# SET="KEY=VALUE ..." adds TrainConfig overrides for every variant (e.g. SET=compile_mode=reduce-overhead).
# PARALLEL=N (default 4) variants train at once on the one GPU: these models keep it busy about a quarter of each
# step (results/profile/profile.md: 16 ms of device time in a step the host takes 50-80 ms to launch), so runs side by
# side finish about N times sooner; their losses are those of the same steps, their tokens/s are measured while
# sharing the GPU (recorded in $OUT/parallel.txt; for throughput, see scripts/gpu/profile_train.sh).
source scripts/gpu/common.sh
set +e  # a background job: a failed variant should not stop the ones after it
STEPS=${1:-}; shift || true
SHAPES=("$@"); [ ${#SHAPES[@]} -gt 0 ] || SHAPES=("n=m" "n=4m")
R=/tmp/frontier-runs
[ -z "${FROM:-}" ] || { mkdir -p $R && cp -rn "$FROM"/. $R/; }
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
cp $DATA/manifest.json $OUT/manifest.json
PARALLEL=${PARALLEL:-4}; echo "$PARALLEL variants at a time on one GPU; overrides: ${SET:-none}; earlier runs from: ${FROM:-none}" > $OUT/parallel.txt
run_one() {  # SHAPE VARIANT
  local dir=${1/=/}
  python3 -m molae.experiments frontier-run "$1" --data $DATA --runs $R ${STEPS:+--steps $STEPS} --only $2 "${SETS[@]}" --no-progress \
    2>&1 | grep -E "final validation|nonfinite|Error|error" | sed "s|^|$dir/$2: |"
  mkdir -p $OUT/runs/$dir/$2 && cp $R/$dir/$2/summary.json $R/$dir/$2/log.jsonl $OUT/runs/$dir/$2/ 2>/dev/null
}
for shape in "${SHAPES[@]}"; do
  for v in $(python3 -c "from molae.frontier import FRONTIER; print(' '.join(FRONTIER['$shape']['variants']))"); do
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
    run_one "$shape" "$v" &
  done
done
wait
echo "frontier.sh done"
