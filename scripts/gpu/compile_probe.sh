# [12] Why our experts break whole-model graphs on the GPU: compile_probe.py with Dynamo's graph-break log.
#   [PROBE_IMPLS=a,b] bash scripts/gpu/compile_probe.sh [SPEC ...]  -> OUT/compile_probe.{json,log}, OUT/breaks.txt
source scripts/gpu/common.sh
TORCH_LOGS=graph_breaks python3 scripts/gpu/compile_probe.py $OUT/compile_probe.json "$@" > $OUT/compile_probe.log 2>&1 || true
grep -v "Warn\|warn\|Loading" $OUT/compile_probe.log | grep -A30 "Graph break" > $OUT/breaks.txt || true
sed -n 1,40p $OUT/breaks.txt | cut -c1-300
grep '^{' $OUT/compile_probe.log | cut -c1-200 || true
