# [11] Where a training step's time goes, per preset (one GPU call, or inside bg.sh):
#   COMMIT=<sha> bash scripts/gpu/profile_train.sh [PRESET[@MODE]...]
# Each run is 40 steps with `--set profile_steps=5` (steps 11-15 profiled, after compilation and warm-up) and a
# log line every 20 steps (the second one's tokens/s is past compilation); PRESET@MODE sets compile_mode=MODE
# (reduce-overhead: each layer a CUDA graph), so the default and graphed layers are measured side by side;
# PRESET@KEY=VALUE,KEY=VALUE sets those training fields instead (e.g. ref-mixtral@compile_scope=model,
# compile_mode=reduce-overhead: the whole model one CUDA graph each way);
# PRESET@old runs an older commit's trainer beside them (the old path, [11]'s before): OLD=DIR holds its molae
# package (git archive COMMIT molae | tar -x -C DIR, here; `run`'s carry takes DIR to the GPU machine: /old-*/ is
# ignored by git), e.g. OLD=old-1f6f682 bash scripts/gpu/profile_train.sh ref-qwen2-moe@old ref-qwen2-moe ...
# OUT/PRESET[@MODE]/ gets the run's summary.json, log.jsonl and profile.txt; OUT/profile.{json,md} their table.
source scripts/gpu/common.sh
RUNS=("$@"); [ ${#RUNS[@]} -gt 0 ] || RUNS=(ref-qwen2-moe ref-qwen2-moe@reduce-overhead ref-deepseek-v3
  ref-deepseek-v3@reduce-overhead frontier-nm frontier-nm@reduce-overhead frontier-n4m frontier-n4m@reduce-overhead)
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
for r in "${RUNS[@]}"; do
  p=${r%@*}; mode=default; [ "$r" = "$p" ] || mode=${r#*@}
  dir=.; [ "$mode" != old ] || { dir=${OLD:?PRESET@old needs OLD=DIR}; mode=default; }
  sets=(); case $mode in *=*) for kv in ${mode//,/ }; do sets+=(--set "$kv"); done;; *) sets=(--set compile_mode=$mode);; esac
  rm -rf /tmp/prof-$r; mkdir -p $OUT/$r
  (cd $dir && PYTHONPATH=$PWD python3 -m molae.train --config $p --data $DATA --out /tmp/prof-$r --steps 40 --set profile_steps=5 \
    "${sets[@]}" --set log_every=20 --set eval_every=40 --set ckpt_every=40 --set eval_tokens=32768 \
    --no-progress 2>&1 | grep -E "^final|Error|error" || true)
  cp /tmp/prof-$r/summary.json /tmp/prof-$r/log.jsonl /tmp/prof-$r/profile.txt $OUT/$r/ 2>/dev/null || true
done
python3 scripts/gpu/profile_report.py $OUT --commit "${COMMIT:-unknown}" --date "$(date -u +%F)" \
  --device "$(device_name)" \
  --command "COMMIT=${COMMIT:-unknown} ${OLD:+OLD=$OLD }bash scripts/gpu/profile_train.sh $*"
