# [6] the layer speed benchmark, one GPU call: bash scripts/gpu/speed.sh [molae bench layer options]
# Runs the CUDA-only tests first (Triton kernel vs reference, no host sync, agreement with transformers),
# then `molae bench layer`, writing speed.json and speed.md to $OUT. The device's git metadata can lag
# the working tree it receives: pass COMMIT=<local HEAD> in the command.
source scripts/gpu/common.sh
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -3
CMD="bash scripts/gpu/speed.sh $*"
python3 -m molae.cli bench layer --out "$OUT" --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
  --command "$CMD" "$@" 2>&1 | grep -v "impl/s\]" | tail -40
