# [8] `molae bench convert` at real shapes, one GPU call per set: COMMIT=<sha> bash scripts/gpu/convert.sh SET
#   a: Qwen3-30B-A3B at 4 layers (data-free, calibrated) and 16 layers (calibrated); DeepSeek-V3 MoE layer from
#      fp8 sources (data-free, calibrated)
#   b: Mixtral-8x7B at 2 layers (data-free, calibrated); Qwen1.5-MoE-A2.7B whole (calibrated)
#   c: re-measures after the memory and speed fixes: DeepSeek-V3 MoE layer from fp8 (calibrated), Qwen3-30B-A3B at
#      4 layers (data-free, calibrated: the time ratio)
#   d: flatness in the layer count at one commit: Qwen3-30B-A3B at 4 and 16 layers, data-free and calibrated
# Every run: --budget 0.5 --projections gate,up,down; calibrated = 16,384 tokens of the standard library.
# Results (results/convert/*.json and convert.md) go to $OUT/results; copy them into results/ locally.
source scripts/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
W=/tmp/bench; rm -rf $W; mkdir -p $W $OUT/results/convert
cp results/convert/*.json $OUT/results/convert/ 2>/dev/null || true  # earlier runs, so convert.md lists all
[ -f /tmp/calib/manifest.json ] || python3 -m molae.cli data prepare $STDLIB/json $STDLIB/email $STDLIB/asyncio \
  $STDLIB/http $STDLIB/xml --out /tmp/calib --vocab-size 4096 --val-fraction 0.1 2>&1 | tail -1
bench() { python3 -m molae.cli bench convert --workdir $W --results $OUT/results --commit "${COMMIT:-unknown}" \
  --budget 0.5 --projections gate,up,down "$@" 2>&1 | grep -v "it/s\]\|s/it\]\|layer/s\]\|Warning\|warn(" | tail -3; }
C=(--calibration /tmp/calib --calib-tokens 16384)
case "$1" in
  a) bench --model qwen3-30b-a3b --layers 4
     bench --model qwen3-30b-a3b --layers 4 "${C[@]}"
     bench --model qwen3-30b-a3b --layers 16 "${C[@]}"
     bench --model deepseek-v3-layer --fp8
     bench --model deepseek-v3-layer --fp8 "${C[@]}" ;;
  b) bench --model mixtral-8x7b --layers 2
     bench --model mixtral-8x7b --layers 2 "${C[@]}"
     bench --model qwen1.5-moe-a2.7b "${C[@]}" ;;
  c) bench --model deepseek-v3-layer --fp8 "${C[@]}"
     bench --model qwen3-30b-a3b --layers 4
     bench --model qwen3-30b-a3b --layers 4 "${C[@]}" ;;
  d) for n in 4 16; do bench --model qwen3-30b-a3b --layers $n; bench --model qwen3-30b-a3b --layers $n "${C[@]}"; done ;;
  *) echo "usage: bash scripts/gpu/convert.sh a|b|c|d"; exit 2 ;;
esac
df -h /tmp | tail -1
