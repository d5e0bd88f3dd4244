"""results/scratch/NAME/ from scripts/gpu/scratch_reference.sh's fetched files:
    python scripts/gpu/scratch_report.py FETCHED NAME results/scratch/NAME --note NOTE.md

Copies train-summary-NAME.json (and train-log-NAME.jsonl) and quality-NAME*.json unchanged and analyze-NAME.json without its per-expert
spectra; writes analysis.md (analyze.format_analysis) and quality.{json,md,png} (`molae bench quality-report`
of the quality files, the analysis summarised last); the exports' files (quality-NAME-quarter/-half.json), with
the end point, go to along/quality.{json,md,png} (the margin along training). NOTE: the provenance paragraph at
the top of quality.md.
"""

import argparse
import json
import shutil
from pathlib import Path

from molae.analyze import format_analysis, without_spectra
from molae.bench.quality import report

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("fetched", type=Path, help="the folder the GPU call's files came back in")
p.add_argument("name", help="the reference's NAME (scratch_reference.sh's second argument)")
p.add_argument("dest", type=Path, help="where the files and reports go")
p.add_argument("--note", type=Path, required=True, help="markdown: the provenance paragraph")
args = p.parse_args()
ALONG = ("quarter", "half")  # scratch_reference.sh's exports, in training order
args.dest.mkdir(parents=True, exist_ok=True)
analysis = without_spectra(json.loads((args.fetched / f"analyze-{args.name}.json").read_text()))
(args.dest / f"analyze-{args.name}.json").write_text(json.dumps(analysis, indent=2) + "\n")
(args.dest / "analysis.md").write_text(f"# `molae analyze` of the {args.name} reference\n\n"
                                       f"{format_analysis(analysis)}\n")
main = args.fetched / f"quality-{args.name}.json"  # first: the other files are compared against it
along = [args.fetched / f"quality-{args.name}-{point}.json" for point in ALONG]
along = [f for f in along if f.exists()]
quality = [main, *sorted(set(args.fetched.glob(f"quality-{args.name}-*.json")) - set(along))]
log = args.fetched / f"train-log-{args.name}.jsonl"  # the training log, where the job kept it
for f in [args.fetched / f"train-summary-{args.name}.json", *([log] if log.exists() else []), *quality, *along]:
    shutil.copy(f, args.dest / f.name)
report([args.dest / f.name for f in quality], args.dest, note=args.note.read_text(),
       analyses={args.name: args.dest / f"analyze-{args.name}.json"})
if along:  # the exports in training order, then the end: the margin along training
    report([args.dest / f.name for f in along] + [args.dest / main.name], args.dest / "along", trend=True,
           note=f"Quality along the training of the {args.name} reference: its exports at {' and '.join(ALONG)} "
                "of the run and its end, the same calibration sample and held-out windows ([10] part 3). Provenance: "
                "[../quality.md](../quality.md).")
print(f"wrote {args.dest}")
