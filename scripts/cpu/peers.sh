# [9] what each peer fix changes, on the CPU: bash scripts/cpu/peers.sh WORK OLD_TREE [NEW_TREE]
# Trains two small references on standard-library code (a Qwen2-MoE-style model, the demo preset: 16 experts
# of m = n/2, top-2, shared expert; and a Mixtral-style one: 8 experts of m = 2n, top-2), then runs
# `molae bench quality` on each with the old code (OLD_TREE: `git archive <commit> molae | tar -x -C OLD_TREE`)
# and with this tree, for the peers whose code changed, at 75/50/25% of the routed-expert parameters, on the
# same calibration and held-out windows. JSON per model and code tree under WORK/.
# NEW_TREE (default: this checkout) lets a snapshot (`git archive HEAD molae`) run while the checkout changes.
set -euo pipefail
WORK=$1; OLD=$2; NEW=${3:-$PWD}
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
mkdir -p "$WORK"
[ -f "$WORK/data/manifest.json" ] || python -m molae.cli data prepare $STDLIB/json $STDLIB/email $STDLIB/asyncio \
  $STDLIB/http $STDLIB/xml $STDLIB/urllib $STDLIB/logging $STDLIB/unittest $STDLIB/concurrent $STDLIB/importlib \
  --out "$WORK/data" --vocab-size 2048 --val-fraction 0.2
cat > "$WORK/mixtral.json" <<JSON
{"name": "cpu-mixtral", "family": "mixtral", "model": {"hidden_size": 128, "num_hidden_layers": 4,
 "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 256, "num_local_experts": 8,
 "num_experts_per_tok": 2, "tie_word_embeddings": false}, "seq_len": 256, "batch_size": 16, "steps": 600,
 "lr": 0.003, "warmup": 30, "log_every": 100, "eval_every": 600, "eval_tokens": 24576, "ckpt_every": 600}
JSON
[ -d "$WORK/qwen/model" ] || python -m molae.cli train --config demo --data "$WORK/data" --out "$WORK/qwen" --no-progress
[ -d "$WORK/mixtral/model" ] || python -m molae.cli train --config "$WORK/mixtral.json" --data "$WORK/data" \
  --out "$WORK/mixtral" --no-progress
COMMON=(--data "$WORK/data" --device cpu --budgets 0.75,0.5,0.25 --rank-ratios 1 --calib-tokens 32768
        --eval-tokens 65536 --seq-len 256 --mobe-steps 2000 --date "$(date -u +%F)" --device-name "CPU (2 cores)")
in_tree() { python "$(dirname "$0")/../in_tree.py" "$@"; }  # a code tree's own `molae`
for model in qwen mixtral; do
  in_tree "$OLD" bench quality --model "$WORK/$model/model" --name "$model (old)" --workdir "$WORK/w-old" \
    --json "$WORK/old-$model.json" --resume --commit "${OLD_COMMIT:-old}" \
    --methods molae-alloc,svd,d2moe,mobe,hcsmoe,prune-reap --command "bash scripts/cpu/peers.sh (old code)" "${COMMON[@]}"
  in_tree "$NEW" bench quality --model "$WORK/$model/model" --name "$model (new)" --workdir "$WORK/w-new" \
    --json "$WORK/new-$model.json" --resume --commit "${COMMIT:-new}" \
    --methods molae-alloc,svd,d2moe,mobe,mobe-lowrank,hcsmoe,prune-reap --command "bash scripts/cpu/peers.sh" \
    "${COMMON[@]}"
done
