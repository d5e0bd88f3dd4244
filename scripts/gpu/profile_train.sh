# [11] Where a training step's time goes, per preset (one GPU call): COMMIT=<sha> bash scripts/gpu/profile_train.sh [PRESETS...]
# Each preset runs 40 steps with `--set profile_steps=5` (steps 11-15 profiled, after compilation and warm-up);
# OUT/PRESET/ gets the run's summary.json (tokens/s, MFU, peak memory) and profile.txt (kernels by device time).
source scripts/gpu/common.sh
PRESETS=("$@"); [ ${#PRESETS[@]} -gt 0 ] || PRESETS=(ref-qwen2-moe ref-deepseek-v3 frontier-nm frontier-n4m)
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
for p in "${PRESETS[@]}"; do
  rm -rf /tmp/prof-$p; mkdir -p $OUT/$p
  python3 -m molae.train --config $p --data $DATA --out /tmp/prof-$p --steps 40 --set profile_steps=5 \
    --set eval_every=40 --set ckpt_every=40 --set eval_tokens=32768 --no-progress 2>&1 | grep -E "^final|Error|error"
  cp /tmp/prof-$p/summary.json /tmp/prof-$p/profile.txt $OUT/$p/ 2>/dev/null
done
