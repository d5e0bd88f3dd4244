"""results/peers.{json,md} from scripts/cpu/peers.sh's output: python scripts/cpu/peers_report.py WORK results

One table per reference model: each method's perplexity at each budget with the old code (before [9]'s peer fixes)
and this code, on the same model, calibration and held-out windows. The JSON holds both runs' files unchanged.
"""

import json
import sys
from pathlib import Path


def table(old: dict, new: dict) -> list[str]:
    def runs(d):
        return {(r["variant"], r["budget"]): r for r in d["runs"] if "perplexity" in r}

    o, n = runs(old), runs(new)
    lines = [f"Original perplexity {new['original']['perplexity']:.3f} (old run: {old['original']['perplexity']:.3f}); "
             f"{new['settings']['eval_tokens']:,} held-out tokens, {new['settings']['calib_tokens']:,} calibration "
             f"tokens. Old code `{old['commit']}`, new code `{new['commit']}`.", "",
             "| method | budget | old code | new code | change |", "|---|---:|---:|---:|---:|"]
    variants = list(dict.fromkeys(v for v, _ in [*o, *n]))
    for v in variants:
        for b in sorted({b for (w, b) in [*o, *n] if w == v}, reverse=True):
            a, c = o.get((v, b)), n.get((v, b))
            fa = f"{a['perplexity']:.3f}" if a else "-"
            fc = f"{c['perplexity']:.3f}" if c else "-"
            ch = f"{100 * (c['perplexity'] / a['perplexity'] - 1):+.2f}%" if a and c else ""
            lines.append(f"| {v} | {b:g} | {fa} | {fc} | {ch} |")
    return lines


def main(work: Path, results: Path):
    out, md = {}, ["# What each peer fix changed ([9]), on two CPU-trained references", ""]
    for model in ("qwen", "mixtral"):
        old = json.loads((work / f"old-{model}.json").read_text())
        new = json.loads((work / f"new-{model}.json").read_text())
        out[model] = dict(old=old, new=new)
        md += [f"## {model}: `{new['model']}`", "", f"- command: `{new['command']}` (old: `{old['command']}`)",
               f"- device: {new['device']}; date {new['date']}", ""] + table(old, new) + [""]
    md += ["One evaluation per cell, no interval: the table shows what moved, and only large moves are read as real.",
           "A `-` in the new column for `mobe` is a budget below MoBE's floor (J = 1 base with A_i m x m), which the "
           "published form cannot reach; `mobe-lowrank` is the labelled variant there."]
    (results / "peers.json").write_text(json.dumps(out, indent=1) + "\n")
    (results / "peers.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
