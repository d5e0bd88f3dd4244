# [12] Decode side by side, this tree against an older one, in one GPU call (or inside bg.sh):
#   COMMIT=<sha> OLD=old-<sha> bash scripts/gpu/decode_compare.sh [SHAPE...]   (default qwen3-30b-a3b deepseek-v3)
# OLD holds the older commit's molae package (git archive SHA molae | tar -x -C old-SHA; `run`'s carry takes it:
# /old-*/ is ignored by git). `molae bench layer`'s decode rows alone (CUDA-graph replays after an L2 flush,
# the copy bandwidth measured in each run) for the standard layer and MoLAE G = 1 and 8, new tree first, then old,
# then again new (so drift between the two shows); OUT/{new,old,new2}/speed.{json,md}; OUT/decode_compare.md
# from them (scripts/gpu/decode_compare.py, which also runs on the CPU from the JSONs).
source scripts/gpu/common.sh
shapes=(); for s in ${@:-qwen3-30b-a3b deepseek-v3}; do shapes+=(--shape $s); done
for run in new:. old:${OLD:?OLD=DIR: the older tree} new2:.; do
  name=${run%%:*}; tree=${run#*:}
  python3 scripts/in_tree.py $tree bench layer "${shapes[@]}" --tokens "" --impls moe,molae-g1,molae-g8 \
    --out $OUT/$name --commit "$([ $name = old ] && echo ${OLD#old-} || echo ${COMMIT:-unknown})" \
    --command "COMMIT=${COMMIT:-unknown} OLD=$OLD bash scripts/gpu/decode_compare.sh $*" 2>&1 | grep -v "impl/s\]" | tail -3
done
python3 scripts/gpu/decode_compare.py $OUT/new/speed.json $OUT/old/speed.json $OUT/new2/speed.json > $OUT/decode_compare.md
cat $OUT/decode_compare.md
