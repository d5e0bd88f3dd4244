"""[12] Decode times of two code trees from `molae bench layer` runs made in one GPU call (decode_compare.sh):

    python3 scripts/gpu/decode_compare.py NEW/speed.json OLD/speed.json [NEW2/speed.json] > decode_compare.md

One row per shape, implementation, groups and tokens: each run's median ms and fraction of the copy bandwidth that
run measured, and old/new (the speed-up of the newer tree). With a second run of the new tree, its ms too and the
new/new2 ratio, the drift between two runs of the same code, against which old/new is read.
"""

import json
import sys


def decode_rows(path):
    result = json.load(open(path))
    rows = {(r["shape"], r["impl"], r["groups"], r["tokens"]): r for r in result["rows"] if r["mode"] == "decode"}
    return result, rows


def main(paths):
    runs = [decode_rows(p) for p in paths]
    (new, new_rows), (old, old_rows) = runs[:2]
    again = runs[2][1] if len(runs) > 2 else None
    print(f"# Decode, commit `{new['commit']}` against `{old['commit']}`, side by side\n")
    print(f"- command: `{new['command']}`; device {new['device']}; date {new['date']}; torch {new['torch']}")
    bandwidths = ", ".join(f"{r['ceilings']['copy_tb_s']:.2f}" for r, _ in runs)
    print(f"- copy bandwidth measured in each run (TB/s, run order new, old{', new again' if again else ''}): "
          f"{bandwidths}")
    print("- each cell: median of CUDA-graph replays after an L2 flush (molae bench layer's decode rows)\n")
    head = "| shape | impl | G | tokens | new ms | old ms | old / new | new % of copy bw | old % |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    if again:
        head, rule = head + " new again ms | new / new again |", rule + "---:|---:|"
    print(head + "\n" + rule)
    for key, n in new_rows.items():
        o = old_rows.get(key)
        if o is None:
            continue
        cells = [*map(str, key), f"{n['ms']:.4f}", f"{o['ms']:.4f}", f"{o['ms'] / n['ms']:.2f}x",
                 f"{100 * n['bandwidth_fraction']:.0f}%", f"{100 * o['bandwidth_fraction']:.0f}%"]
        if again and key in again:
            cells += [f"{again[key]['ms']:.4f}", f"{n['ms'] / again[key]['ms']:.2f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
