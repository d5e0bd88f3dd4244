# FSDP2 scaling on one host (run on nvidia-h200-x2): the same preset and per-GPU batch on 1 and on 2 GPUs
# (weak scaling); efficiency = tokens/s on 2 GPUs / (2 x tokens/s on 1). Report:
#   python -m molae.experiments scaling OUT/scaling.jsonl --commit C --device "..." --date D
source scripts/gpu/common.sh
PRESET=${1:-ref-qwen2-moe}; STEPS=${2:-150}
prepare_data results/data/tokenizer 2>&1 | tail -1
for n in 1 2; do
  rm -rf /tmp/scale-$n
  torchrun --nproc-per-node $n -m molae.train --config $PRESET --data $DATA --out /tmp/scale-$n --steps $STEPS \
    --set warmup=20 --set log_every=25 --set eval_every=100000 --set ckpt_every=100000 --set compile=false \
    --no-progress 2>&1 | grep -E "^final|Error|error" || true
  collect_run /tmp/scale-$n >> $OUT/scaling.jsonl
done
