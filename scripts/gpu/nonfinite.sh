# [11] The DeepSeek-V3-style preset's non-finite gradients, cuDNN attention off (the trainer's default since
# cudnn_attention) against on (the old path), same seed and data, one after the other:
#   COMMIT=<sha> bash scripts/gpu/nonfinite.sh [STEPS]   (default 1500; 243a61b's runs skipped their first step at 416)
# OUT/nonfinite.jsonl: one line per run (summary.json + its log: skipped_steps, every nonfinite_grad and the
# first one's nonfinite_origin, tokens/s, validation loss); OUT/nonfinite.md the table.
source scripts/gpu/common.sh
STEPS=${1:-1500}
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
rm -f $OUT/nonfinite.jsonl
for cudnn in false true; do
  name=cudnn-$cudnn
  rm -rf /tmp/nf-$name
  python3 -m molae.train --config ref-deepseek-v3 --data $DATA --out /tmp/nf-$name --steps $STEPS --set log_every=50 \
    --set eval_every=$STEPS --set ckpt_every=$STEPS --set cudnn_attention=$cudnn "${SETS[@]}" --no-progress 2>&1 \
    | grep -E "^final|nonfinite|Error|error" | cut -c1-400 || true
  collect_run /tmp/nf-$name $name >> $OUT/nonfinite.jsonl
done
python3 - "$OUT" "${COMMIT:-unknown}" "$STEPS" "$(date -u +%F)" \
  "$(device_name)" <<'EOF'
import json, sys
out, commit, steps, date, device = sys.argv[1:]
runs = [json.loads(x) for x in open(f"{out}/nonfinite.jsonl")]
lines = ["# Non-finite gradients of ref-deepseek-v3, cuDNN attention off and on ([11])", "",
         f"- command: `COMMIT={commit} bash scripts/gpu/nonfinite.sh {steps}`; device {device}; "
         f"date {date}; commit `{commit}`; torch {runs[0]['torch']}", "",
         "| run | steps | skipped steps | first skipped | where the first arose (nonfinite_origin) | tokens/s | val loss |",
         "|---|---:|---:|---:|---|---:|---:|"]
for r in runs:
    bad = [x for x in r["log"] if x.get("event") == "nonfinite_grad"]
    origin = next((x for x in r["log"] if x.get("event") == "nonfinite_origin"), {})
    where = {k: v for k, v in origin.items() if k not in ("step", "event", "time")}
    lines.append(f"| {r['variant']} | {r['config']['steps']} | {r['skipped_steps']} | "
                 f"{bad[0]['step'] if bad else ''} | {json.dumps(where)[:300] if where else ''} | "
                 f"{r['tokens_per_s']:,.0f} | {r['final_val_loss']:.4f} |")
open(f"{out}/nonfinite.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
