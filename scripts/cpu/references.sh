# The two CPU references of [9]-[10] and their data, trained once into WORK (what scripts/cpu/peers.sh,
# fair_heal.sh and upcycled.sh read): bash scripts/cpu/references.sh WORK
# A Qwen2-MoE-style model (the demo preset: 16 experts of m = n/2, top-2, shared expert) and a Mixtral-style one
# (8 experts of m = 2n, top-2), on standard-library code; skipped where WORK already has them.
set -euo pipefail
WORK=$1
mkdir -p "$WORK"
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
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
