# The README's pasted CPU outputs, re-run in order from a fresh directory: bash scripts/cpu/readme.sh DIR
# (about 10 minutes on 2 idle cores; run nothing else meanwhile: several outputs print times and speeds).
# Each command's output goes to DIR/NN-name.txt, with its wall time and the commit in DIR/meta.txt.
set -uo pipefail
D=${1:?usage: bash scripts/cpu/readme.sh DIR}; SHARED=${SHARED:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
rm -rf "$D" /tmp/rrun /tmp/r2 /tmp/w; mkdir -p "$D"; cd "$D"
echo "commit $(git -C "$REPO" rev-parse --short HEAD) $(date -u +%F) $(nproc) cores" > meta.txt
step() { local name=$1; shift; local t0=$(date +%s.%N)
  { echo "\$ $*"; "$@"; } > "$name.txt" 2>&1; echo "$name rc $? $(python -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s" >> meta.txt; }
step 01-demo /usr/bin/time -f "peak RSS %M KB" molae demo --out demo-out
step 02-convert molae convert demo-out/model --out demo-molae --latent-dim 32 --report demo-molae-report.json
step 03-load python -c "
import torch
import molae  # registers the molae_<family> model types with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained('demo-molae')
tok = AutoTokenizer.from_pretrained('demo-molae')
print(type(model).__name__, model.model.layers[0].mlp.experts)
ids = tok('    def __init__(self, name):\n        self.', return_tensors='pt').input_ids
torch.manual_seed(0)
out = model.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.7, top_k=20)
print(repr(tok.decode(out[0][ids.shape[1]:])))"
step 04-decompress molae decompress demo-molae --out demo-plain
EVAL=(--text "$SHARED/wikitext-2/test.txt" --context 256 --batch-size 32 --tasks gsm8k_mc_local,gsm8k_local
      --data-dir "$SHARED" --limit 100 --num-fewshot 0)
step 05-eval-original molae eval demo-out/model "${EVAL[@]}"
step 06-eval-molae molae eval demo-molae "${EVAL[@]}"
step 07-analyze molae analyze demo-out/model --out analysis
step 08-convert-35 molae convert demo-out/model --out demo-35 --budget 0.35 --projections gate,up,down \
  --calibration "$STDLIB/json" --calib-tokens 16384 --calib-seq-len 256
step 09-svd-35 molae convert demo-out/model --out demo-svd-35 --method svd --budget 0.35 --projections gate,up,down \
  --calibration "$STDLIB/json" --calib-tokens 16384 --calib-seq-len 256
step 10-eval-text-original molae eval demo-out/model --text "$STDLIB/textwrap.py" --context 256
step 11-eval-text-35 molae eval demo-35 --text "$STDLIB/textwrap.py" --context 256
step 12-eval-text-svd-35 molae eval demo-svd-35 --text "$STDLIB/textwrap.py" --context 256
step 13-heal molae heal demo-35 --teacher demo-out/model --data "$STDLIB" --tokens 262144 --seq-len 256 --batch-size 16
step 14-eval-text-healed molae eval demo-35 --text "$STDLIB/textwrap.py" --context 256
step 15-data-prepare molae data prepare "$STDLIB/json" "$STDLIB/email" "$STDLIB/asyncio" "$STDLIB/http" "$STDLIB/xml" \
  "$STDLIB/urllib" --out /tmp/rd --vocab-size 2048 --val-fraction 0.2 --overwrite
step 16-train molae train --config demo --data /tmp/rd --out /tmp/rrun --steps 100 --set eval_every=50 --set log_every=25
step 17-bad-heal molae heal demo-35 --teacher demo-out/model --data /tmp/rd --tokens 65536
step 18-bad-train molae train --config demo --data /tmp/rd --out /tmp/r2 --set lr=abc
step 19-bad-bench molae bench quality --model demo-out/model --name demo --data /tmp/rd --workdir /tmp/w --json q.json
cat meta.txt
