# [12] `molae bench generate` on the GPU, one call: COMMIT=<sha> bash scripts/gpu/generate.sh [EXTRA ARGS]
# Qwen3-30B-A3B's shapes with 4 MoE layers and DeepSeek-V3's with 2 (behind its 3 dense ones), built in memory;
# every implementation; then the same with --compile. Results to $OUT/results/generate{,-compile}/.
source scripts/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for mode in "" "--compile"; do
  dir=$OUT/results/generate${mode:+-compile}
  python3 -m molae.cli bench generate --model qwen3-30b-a3b:4 --model deepseek-v3:2 --out $dir $mode \
    --commit "${COMMIT:-unknown}" --command "COMMIT=${COMMIT:-unknown} bash scripts/gpu/generate.sh $*" "$@" 2>&1 \
    | grep -v "Warning\|warn(" | tail -30
done
