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
# [12] kernel tables (scripts/gpu/profile_layer.py): Qwen3-30B-A3B's MoLAE decode at 1 and 8 tokens (which of its
# five to seven launches take the 55-110 us), and Qwen1.5-MoE's eager forward at 2048 tokens (host-bound, 1f6f682)
for run in "qwen3-30b-a3b molae-g1 1" "qwen3-30b-a3b molae-g1 8" "qwen3-30b-a3b moe 1" "qwen1.5-moe-a2.7b molae-g1 2048"; do
  set -- $run
  python3 scripts/gpu/profile_layer.py $1 $2 $3 forward 2>&1 | grep -v Warning >> $OUT/kernel-profile.txt || true
done
grep "^==" $OUT/kernel-profile.txt || true
