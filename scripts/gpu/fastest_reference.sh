# [10] with [11]'s speed-ups, in one stretch of GPU time (a background job, collected across calls):
#   COMMIT=<sha> bash scripts/gpu/bg.sh start NAME bash scripts/gpu/fastest_reference.sh PRESET NAME LENGTH [SETTING...]
# Profiles PRESET's training with its own settings and with each SETTING (KEY=VALUE,KEY=VALUE; default: the layers
# as CUDA graphs, and the whole model compiled, graphed or not) side by side (profile_train.sh, into $OUT/prof),
# then trains and evaluates the scratch reference (scratch_reference.sh PRESET NAME LENGTH) with the fastest of them
# whose validation loss after the 40 profiled steps is at most 0.01 above the preset's own ($OUT/chosen.txt says).
source scripts/gpu/common.sh
set +e
PRESET=$1; NAME=$2; LENGTH=$3; shift 3
CANDIDATES=("$@"); [ ${#CANDIDATES[@]} -gt 0 ] || CANDIDATES=(compile_mode=reduce-overhead compile_scope=model
  compile_scope=model,compile_mode=reduce-overhead)
OUT=$OUT/prof bash scripts/gpu/profile_train.sh $PRESET "${CANDIDATES[@]/#/$PRESET@}" > $OUT/prof.log 2>&1
CHOSEN=$(python3 - "$OUT/prof" "$PRESET" "${CANDIDATES[@]}" <<'P'
import json, math, sys
root, preset, candidates = sys.argv[1], sys.argv[2], sys.argv[3:]
def run(name):
    try:
        s = json.load(open(f"{root}/{name}/summary.json"))
        return s["tokens_per_s"], s["final_val_loss"]
    except (OSError, KeyError, ValueError):
        return 0.0, math.nan
speed, loss = run(preset)
best = ("", speed)
for c in candidates:
    s, l = run(f"{preset}@{c}")
    if math.isfinite(l) and (not math.isfinite(loss) or l <= loss + 0.01) and s > best[1]:
        best = (c, s)
print(best[0].replace(",", " "))
P
)
echo "settings: ${CHOSEN:-none (the preset as it is)}" | tee $OUT/chosen.txt
SET="$CHOSEN" bash scripts/gpu/scratch_reference.sh $PRESET $NAME $LENGTH > $OUT/ref.log 2>&1
