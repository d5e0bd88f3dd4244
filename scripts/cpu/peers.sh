# [9] what each peer fix changes, on the CPU: bash scripts/cpu/peers.sh WORK OLD_TREE [NEW_TREE]
# Trains the two small CPU references (scripts/cpu/references.sh), then runs
# `molae bench quality` on each with the old code (OLD_TREE: `git archive <commit> molae | tar -x -C OLD_TREE`)
# and with this tree, for the peers whose code changed, at 75/50/25% of the routed-expert parameters, on the
# same calibration and held-out windows. JSON per model and code tree under WORK/.
# NEW_TREE (default: this checkout) lets a snapshot (`git archive HEAD molae`) run while the checkout changes.
set -euo pipefail
WORK=$1; OLD=$2; NEW=${3:-$PWD}
bash "$(dirname "$0")/references.sh" "$WORK"
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
