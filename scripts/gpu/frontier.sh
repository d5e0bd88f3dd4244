# [11] The pretraining frontier (molae/frontier.py's plan), one background job collected across GPU calls:
#   COMMIT=<sha> bash scripts/gpu/bg.sh start frontier bash scripts/gpu/frontier.sh [STEPS [SHAPES...]]
#   WAIT=540 bash scripts/gpu/bg.sh wait frontier        (later calls, while the machine stays warm)
# Each variant in plan order (standard MoEs first, so a partial job still gives a fit), STEPS steps of 64 x 512
# tokens (default the presets' 6000: 197M tokens); after each, its summary.json and log.jsonl land in
# $OUT/runs/SHAPE/VARIANT (the checkpoints stay on the machine). A finished run is skipped if the job is started
# again on the same machine. Then, here: python -m molae.experiments frontier --runs FETCHED/runs ...
source scripts/gpu/common.sh
set +e  # a background job: a failed variant should not stop the ones after it
STEPS=${1:-6000}; shift || true
SHAPES=("$@"); [ ${#SHAPES[@]} -gt 0 ] || SHAPES=("n=m" "n=4m")
R=/tmp/frontier-runs
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
cp $DATA/manifest.json $OUT/manifest.json
for shape in "${SHAPES[@]}"; do
  dir=${shape/=/}
  for v in $(python3 -c "from molae.frontier import FRONTIER; print(' '.join(FRONTIER['$shape']['variants']))"); do
    python3 -m molae.experiments frontier-run "$shape" --data $DATA --runs $R --steps $STEPS --only $v --no-progress \
      2>&1 | grep -E "final validation|nonfinite|Error|error"
    mkdir -p $OUT/runs/$dir/$v && cp $R/$dir/$v/summary.json $R/$dir/$v/log.jsonl $OUT/runs/$dir/$v/ 2>/dev/null
  done
done
echo "frontier.sh done"
