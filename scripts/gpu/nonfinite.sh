# [11] The DeepSeek-V3-style preset's non-finite gradients, before and after their root cause was removed: the
# end-of-text token (id 0) as pad id gave it a zero, never-trained embedding (padding_idx), so a window starting
# with it carried a zero residual row that each RMSNorm's backward multiplied by 1/sqrt(eps). Same seed and data:
#   COMMIT=<sha> [SET="KEY=VALUE ..."] bash scripts/gpu/nonfinite.sh [STEPS]   (default 3000)
# Both runs at once on the one GPU (their tokens/s are each about half a lone run's: not a speed comparison).
# OUT/nonfinite.jsonl: one line per run (summary.json + its log: skipped_steps, every nonfinite_grad and the
# first one's nonfinite_origin, validation loss); OUT/nonfinite.md the table.
source scripts/gpu/common.sh
STEPS=${1:-3000}
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
rm -f $OUT/nonfinite.jsonl
declare -A VARIANT=([pad-eot]="--set model.pad_token_id=0" [no-pad]="")
for name in pad-eot no-pad; do
  rm -rf /tmp/nf-$name
  python3 -m molae.train --config ref-deepseek-v3 --data $DATA --out /tmp/nf-$name --steps $STEPS --set log_every=50 \
    --set eval_every=$STEPS --set ckpt_every=$STEPS ${VARIANT[$name]} "${SETS[@]}" --no-progress > /tmp/nf-$name.log 2>&1 &
done
wait
for name in pad-eot no-pad; do
  grep -E "^final|Error|error" /tmp/nf-$name.log | cut -c1-300 || true
  collect_run /tmp/nf-$name $name >> $OUT/nonfinite.jsonl
done
python3 - "$OUT" "${COMMIT:-unknown}" "$STEPS" "$(date -u +%F)" "$(device_name)" "${SET:-}" <<'PY'
import json, sys
out, commit, steps, date, device, sets = sys.argv[1:]
runs = [json.loads(x) for x in open(f"{out}/nonfinite.jsonl")]
lines = ["# Non-finite gradients of ref-deepseek-v3: end-of-text as pad id (before) and no pad id (after) ([11])", "",
         f"- command: `COMMIT={commit} SET=\"{sets}\" bash scripts/gpu/nonfinite.sh {steps}`; device {device}; "
         f"date {date}; commit `{commit}`; torch {runs[0]['torch']}; both runs at once on the one GPU", "",
         "| run | steps | skipped steps | first skipped | first non-finite gradient (module) | smallest norm input row "
         "there | val loss |", "|---|---:|---:|---:|---|---|---:|"]
for r in runs:
    bad = [x for x in r["log"] if x.get("event") == "nonfinite_grad"]
    o = next((x for x in r["log"] if x.get("event") == "nonfinite_origin"), {})
    rows = [x for x in o.get("forward_absmax", []) if "input_min_rms" in x]
    low = min(rows, key=lambda x: x["input_min_rms"]) if rows else None
    at = (f"{low['name']}: rms {low['input_min_rms']:.2g}, token {low.get('token')} at position "
          f"{low.get('position')}; {sum(x['input_min_rms'] < 1e-3 for x in rows)} of {len(rows)} norms below 1e-3"
          if low else "")
    lines.append(f"| {r['variant']} | {r['config']['steps']} | {r['skipped_steps']} | {bad[0]['step'] if bad else ''} | "
                 f"{o.get('backward_first_nonfinite') or ''} | {at} | {r['final_val_loss']:.4f} |")
open(f"{out}/nonfinite.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
