# [12] Why our experts break whole-model graphs on the GPU: compile_probe.py with Dynamo's graph-break log.
#   bash scripts/gpu/compile_probe.sh [SPEC ...]  -> OUT/compile_probe.json, OUT/compile_probe.log
source scripts/gpu/common.sh
TORCH_LOGS=graph_breaks python3 scripts/gpu/compile_probe.py $OUT/compile_probe.json "$@" > $OUT/compile_probe.log 2>&1 || true
grep -v "Warn\|warn\|Loading" $OUT/compile_probe.log | grep -A12 "Graph break" | head -60 | cut -c1-300
