# [12] Where compiled batch-1 decoding spends its time, per implementation (decode_probe.py), with Inductor's
# performance hints (it logs when and why it skips CUDA graphs):
#   COMMIT=<sha> [PROBE_IMPLS=moe,molae] bash scripts/gpu/decode_probe.sh [SPEC]   (default qwen3-30b-a3b:4)
# -> OUT/decode_probe.{json,log}, OUT/cudagraph_hints.txt
source scripts/gpu/common.sh
TORCH_LOGS=perf_hints python3 scripts/gpu/decode_probe.py $OUT/decode_probe.json "$@" > $OUT/decode_probe.log 2>&1 \
  || true
grep -i "cudagraph" $OUT/decode_probe.log | sort | uniq -c | sort -rn > $OUT/cudagraph_hints.txt || true
grep -v "Warn\|warn" $OUT/decode_probe.log | grep -E "ms/token|us/token|Error" | cut -c1-220 || true
sed -n 1,20p $OUT/cudagraph_hints.txt | cut -c1-300
