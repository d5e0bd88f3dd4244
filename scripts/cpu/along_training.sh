# [10] part 3 on the CPU: does MoLAE's margin over the peers grow or shrink as the experts train?
#   COMMIT=<sha> bash scripts/cpu/along_training.sh WORK OUT
# Trains the Mixtral-style CPU reference of scripts/cpu/peers.sh again (WORK/data and WORK/mixtral.json from
# that script), exported also at a quarter and a half of its steps, and runs `molae bench quality` at each
# point: MoLAE (G = 1 and G per layer), SVD and D2-MoE at 50% and 25%, on the same calibration and windows.
set -euo pipefail
WORK=$1; OUT=$2
mkdir -p "$OUT"
[ -d "$WORK/along/model" ] || python -m molae.cli train --config "$WORK/mixtral.json" --data "$WORK/data" \
  --out "$WORK/along" --export-at 0.25,0.5 --no-progress | tail -1
cp "$WORK/along/summary.json" "$OUT/train-summary.json"
for point in model-step150 model-step300 model; do
  python -m molae.cli bench quality --model "$WORK/along/$point" --name "cpu-mixtral $point" \
    --workdir "$WORK/w-along" --json "$OUT/quality-$point.json" --resume --data "$WORK/data" --device cpu \
    --budgets 0.5,0.25 --methods molae-alloc,molae-alloc-g,svd,d2moe --calib-tokens 32768 --eval-tokens 65536 \
    --seq-len 256 --commit "${COMMIT:-unknown}" --date "$(date -u +%F)" --device-name "CPU (2 cores)" \
    --command "COMMIT=${COMMIT:-unknown} bash scripts/cpu/along_training.sh $WORK $OUT" 2>&1 \
    | grep -v "Warning\|warn(" | tail -1
done
