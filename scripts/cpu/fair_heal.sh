# [10] part 5 on the CPU: MoLAE and SVD, each without and with the same whole-model healing budget, on the two
# CPU references of scripts/cpu/references.sh (WORK holds them and their data: run that first):
#   COMMIT=<sha> bash scripts/cpu/fair_heal.sh WORK OUT [METHODS [SUFFIX]]
# METHODS (default molae-alloc,molae-alloc+heal,svd,svd+heal) go to OUT/quality-cpu-MODEL[SUFFIX].json; MoBE fits
# MOBE_STEPS Adam steps (default 2000, as peers.sh).
set -euo pipefail
WORK=$1; OUT=$2; METHODS=${3:-molae-alloc,molae-alloc+heal,svd,svd+heal}; SUFFIX=${4:-}
mkdir -p "$OUT"
for model in qwen mixtral; do
  python -m molae.cli bench quality --model "$WORK/$model/model" --name "cpu-$model" --workdir "$WORK/w-heal" \
    --json "$OUT/quality-cpu-$model$SUFFIX.json" --resume --data "$WORK/data" --device cpu --budgets 0.5,0.25 \
    --methods $METHODS --calib-tokens 32768 --eval-tokens 65536 --seq-len 256 --mobe-steps ${MOBE_STEPS:-2000} \
    --heal-tokens 262144 --commit "${COMMIT:-unknown}" --date "$(date -u +%F)" --device-name "CPU (2 cores)" \
    --command "COMMIT=${COMMIT:-unknown} bash scripts/cpu/fair_heal.sh $WORK $OUT $METHODS $SUFFIX" 2>&1 | grep -v "Warning\|warn(" | tail -2
done
