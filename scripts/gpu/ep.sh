# [13] `molae bench ep` on K GPUs of one host (not yet run: no machine with several GPUs has been lent):
#   COMMIT=<sha> bash scripts/gpu/ep.sh K        (K = 2, 4 or 8; kind nvidia-h200-xK)
# DeepSeek-V3 and Qwen3-30B-A3B layer shapes, 4096 and 16384 tokens per rank, standard EP against MoLAE EP at
# d = m and at --budget 0.5's uniform d, forward and forward+backward. JSON + markdown to $OUT/results/ep-K/.
source scripts/gpu/common.sh
K=${1:?usage: bash scripts/gpu/ep.sh K}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m molae.cli bench ep --procs "$K" --device cuda --shape deepseek-v3 --shape qwen3-30b-a3b \
  --tokens 4096,16384 --repeats 20 --out "$OUT/results/ep-$K" --commit "${COMMIT:-unknown}" 2>&1 | tail -30
