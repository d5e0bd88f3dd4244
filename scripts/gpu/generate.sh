# [12] `molae bench generate` on the GPU: COMMIT=<sha> bash scripts/gpu/generate.sh [EXTRA ARGS]   (or inside bg.sh)
# Qwen3-30B-A3B's shapes with 4 MoE layers and DeepSeek-V3's with 2 (behind its 3 dense ones), built in memory;
# with --compile (generate's own compilation, CUDA graphs) every implementation but hf-eager, then every one eager
# (transformers' eager experts loop is data-dependent: compiling it runs for many minutes). Results to
# $OUT/results/generate{,-compile}/ (generate.json rewritten after each implementation, so a cut run keeps them);
# each measurement prints a line as it ends.
source scripts/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# MODELS: the models (default below); GEN_IMPLS: the compiled pass's implementations (default below); MODES="compile eager" (the default order: the compiled pass, what a server runs, first) or either alone
for m in ${MODES:-compile eager}; do
  mode=; [ "$m" = eager ] || mode=--compile
  dir=$OUT/results/generate${mode:+-compile}
  # hf-batched_mm left out of the compiled pass: eager, it ran out of memory at 2048 prefill tokens (1f6f682)
  impls=(); [ -z "$mode" ] || impls=(--impls ${GEN_IMPLS:-hf-grouped_mm,moe,molae,moe/grouped,molae/grouped})
  models=(); for x in ${MODELS:-qwen3-30b-a3b:4 deepseek-v3:2}; do models+=(--model $x); done
  python3 -m molae.cli bench generate "${models[@]}" --out $dir $mode "${impls[@]}" \
    --commit "${COMMIT:-unknown}" --command "COMMIT=${COMMIT:-unknown} MODES='${MODES:-compile eager}' GEN_IMPLS='${GEN_IMPLS:-}' MODELS='${MODELS:-}' bash scripts/gpu/generate.sh $*" "$@" 2>&1 \
    | grep --line-buffered -v "Warning\|warn(" || true
done
