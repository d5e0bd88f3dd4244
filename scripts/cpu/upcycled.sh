# [10] parts 2 and 7 on the CPU: does an upcycled MoE's expert redundancy look different from a scratch one's?
#   COMMIT=<sha> bash scripts/cpu/upcycled.sh WORK OUT
# WORK/data from scripts/cpu/references.sh (standard-library code, 2048-token BPE). A dense Qwen2-family model (FFN
# F = 512, every layer dense) is trained 400 steps; `--upcycle-from` it, 16 routed experts of m = 128 (4 shuffled
# copies of 4 partitions, half of each expert's neurons re-initialised), top-4, a shared expert holding one whole
# copy, trained 400 more steps; the same MoE from scratch, the same 400 steps and learning rate. Then `molae
# analyze` of both MoEs and `molae bench quality` (MoLAE with G = 1 and G per layer, SVD; 50% and 25%) on both.
set -euo pipefail
WORK=$1; OUT=$2
mkdir -p "$OUT"
model='"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
 "intermediate_size": 512, "moe_intermediate_size": 128, "shared_expert_intermediate_size": 512, "num_experts": 16,
 "num_experts_per_tok": 4, "norm_topk_prob": false, "tie_word_embeddings": false'
run='"seq_len": 256, "batch_size": 16, "steps": 400, "warmup": 30, "log_every": 100, "eval_every": 400,
 "eval_tokens": 24576, "ckpt_every": 400'
echo "{\"name\": \"cpu-dense\", \"family\": \"qwen2_moe\", \"model\": {$model, \"mlp_only_layers\": [0, 1, 2, 3]},
 $run, \"lr\": 0.003}" > "$WORK/dense.json"
echo "{\"name\": \"cpu-upcycled\", \"family\": \"qwen2_moe\", \"model\": {$model}, $run, \"lr\": 0.0015,
 \"upcycle\": {\"shuffle\": true, \"reinit\": 0.5}}" > "$WORK/upcycled.json"
train() { [ -d "$WORK/$1/model" ] || python -m molae.cli train --data "$WORK/data" --out "$WORK/$1" --no-progress \
  "${@:2}" | tail -1; cp "$WORK/$1/summary.json" "$OUT/train-summary-$1.json"; }
train up-dense --config "$WORK/dense.json"
train up-moe --config "$WORK/upcycled.json" --upcycle-from "$WORK/up-dense/model"
train up-scratch --config "$WORK/upcycled.json" --set upcycle=null
for m in up-moe up-scratch; do
  python -m molae.cli analyze "$WORK/$m/model" --out "$WORK/analyze-$m" --overwrite --device cpu | tail -1
  cp "$WORK/analyze-$m/analysis.json" "$OUT/analyze-$m.json"
  python -m molae.cli bench quality --model "$WORK/$m/model" --name "cpu $m" --workdir "$WORK/w-$m" \
    --json "$OUT/quality-$m.json" --resume --data "$WORK/data" --device cpu --budgets 0.5,0.25 \
    --methods molae-alloc,molae-alloc-g,svd --calib-tokens 32768 --eval-tokens 65536 --seq-len 256 \
    --commit "${COMMIT:-unknown}" --date "$(date -u +%F)" --device-name "CPU (2 cores)" \
    --command "COMMIT=${COMMIT:-unknown} bash scripts/cpu/upcycled.sh $WORK $OUT" 2>&1 | grep -v "Warning\|warn(" | tail -1
done
