# [6] the layer speed benchmark, one GPU call: bash scripts/gpu/speed.sh [molae bench layer options]
# Runs the CUDA-only tests first (Triton kernel vs reference, no host sync, agreement with transformers),
# then `molae bench layer`, writing speed.json and speed.md to $OUT. The device's git metadata can lag
# the working tree it receives: pass COMMIT=<local HEAD> in the command.
source scripts/gpu/common.sh
# a failing test is reported and the benchmark still runs (set -e with pipefail stopped the script there)
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -3 || true
CMD="bash scripts/gpu/speed.sh $*"
python3 -m molae.cli bench layer --out "$OUT" --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
  --command "$CMD" "$@" 2>&1 | grep -v "impl/s\]" | tail -40
# [12]'s cliffs: where Qwen1.5-MoE's MoLAE forward goes between 1024 and 4096 tokens (and the standard layer's at 2048)
for run in "molae-g1 1024" "molae-g1 2048" "molae-g1 4096" "moe 2048"; do
  set -- $run
  python3 scripts/gpu/profile_layer.py qwen1.5-moe-a2.7b $1 $2 forward 2>&1 | grep -v Warning >> $OUT/cliff-profile.txt || true
done
grep "^==" $OUT/cliff-profile.txt || true
