# Sourced by the GPU scripts: environment and the code corpus (site-packages + standard library).
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=$(python3 -c "import site; print(site.getsitepackages()[0])")
STDLIB=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
DATA=/tmp/molae-data
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
