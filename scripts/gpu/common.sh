# Sourced by the GPU scripts: environment and the code corpus (site-packages + standard library).
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=$(python3 -c "import site; print(site.getsitepackages()[0])")
STDLIB=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
DATA=${DATA:-/tmp/molae-data}
# DRY=1: rehearse a GPU script on this machine's CPU, with DATA a prepared corpus already here and a small preset
# (e.g. DRY=1 DATA=DIR bash scripts/gpu/fastest_reference.sh demo dry 30steps): small evaluations, the same steps,
# so a script's own mistakes show before they cost device time
DEVICE=cuda; EVAL_TOKENS=1048576; HEAL_TOKENS=1048576; MOBE_STEPS=300
[ -z "${DRY:-}" ] || { DEVICE=cpu; EVAL_TOKENS=8192; HEAL_TOKENS=8192; MOBE_STEPS=5; }
device_name() { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo "CPU (a DRY rehearsal)"; }
SETS=(); for kv in ${SET:-}; do SETS+=(--set "$kv"); done  # SET="KEY=VALUE ...": training overrides as --set
prepare_data() {  # $1: optional saved tokenizer directory (the one results/ record), else train one
  local tok=()
  [ -n "${1:-}" ] && tok=(--tokenizer "$1")
  python3 -m molae.cli data prepare "$SITE" "$STDLIB" --out "$DATA" --vocab-size 16384 "${tok[@]}"
}
collect_run() {  # $1: run directory, $2: optional variant name; prints summary.json + its log as one JSON line
  python3 -c "
import json, sys
from molae.train import read_log
s = json.load(open(sys.argv[1] + '/summary.json')); s['log'] = read_log(sys.argv[1] + '/log.jsonl')
if len(sys.argv) > 2: s['variant'] = sys.argv[2]
print(json.dumps(s))" "$@"
}
# [10]'s conversion-quality runs (scripts/gpu/upcycled.sh, scratch_reference.sh): the main methods, healed and not
# (mobe-lowrank: MoBE where its published form cannot reach the budget, as at m > n: Mixtral)
MAIN_METHODS=molae-alloc,molae-alloc+heal,molae-alloc-g,molae-alloc-g+heal,molae-alloc-sqrt,molae-alloc-sqrt+heal,molae-alloc-g-sqrt,molae-alloc-g-sim,molae-alloc-g-div,svd,svd+heal,d2moe,d2moe+heal,mobe,mobe+heal,mobe-lowrank,mobe-lowrank+heal,mobe-linear,hcsmoe,hcsmoe+heal,prune-reap,prune-reap+heal
quality_1m() {  # NAME MODEL WORKDIR SEED METHODS BUDGETS COMMAND -> $OUT/quality-NAME.json (1,048,576 held-out tokens)
  python3 -m molae.cli bench quality --model "$2" --name "$1" --data $DATA --device $DEVICE --workdir "$3" \
    --json $OUT/quality-$1.json --eval-tokens $EVAL_TOKENS --heal-tokens $HEAL_TOKENS --mobe-steps $MOBE_STEPS \
    --calib-seed "$4" --methods "$5" --budgets "$6" --commit "${COMMIT:-unknown}" --device-name "$(device_name)" \
    --date "$(date -u +%F)" --command "$7" 2>&1 | grep -v "Warning\|warn(\|it/s\]\|run/s\]" | tail -2
}
analyze_to() {  # NAME MODEL -> $OUT/analyze-NAME/analysis.json (the plots dropped: the JSON is what comes back)
  python3 -m molae.cli analyze "$2" --out $OUT/analyze-$1 --device $DEVICE 2>&1 | tail -1; rm -f $OUT/analyze-$1/*.png
}
