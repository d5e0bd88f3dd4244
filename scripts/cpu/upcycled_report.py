"""results/cpu_upcycled/ from scripts/cpu/upcycled.sh's output: python scripts/cpu/upcycled_report.py OUT DEST

analysis.md: the upcycled MoE's and its scratch twin's `molae analyze` side by side (analyze.format_comparison),
then each one whole (analyze.format_analysis); quality.{json,md,png}: `molae bench quality-report` of both.
The run files are copied unchanged (the analyses without their per-expert spectra, to keep them small).
"""

import json
import shutil
import sys
from pathlib import Path

from molae.analyze import format_analysis, format_comparison, without_spectra
from molae.bench.quality import report

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
dest.mkdir(parents=True, exist_ok=True)
names = {"upcycled": "up-moe", "scratch": "up-scratch"}
analyses = {}
for label, run in names.items():
    a = without_spectra(json.loads((src / f"analyze-{run}.json").read_text()))
    (dest / f"analyze-{run}.json").write_text(json.dumps(a, indent=2) + "\n")
    analyses[label] = a
for f in [*src.glob("train-summary-*.json"), *src.glob("quality-*.json")]:
    shutil.copy(f, dest / f.name)
lines = ["# The CPU upcycled MoE and its scratch twin: expert redundancy side by side", "",
         "Written by scripts/cpu/upcycled_report.py from the two `molae analyze` files here. Per layer and kind: "
         "row-space overlap minus that of random subspaces of the same ranks, mean expert rank at 90% energy over "
         "m, and the shared latent d (G = 1) keeping 90% of the stacked energy over n.", "",
         format_comparison(analyses), ""]
for label, a in analyses.items():
    lines += [f"## {label}", "", format_analysis(a), ""]
(dest / "analysis.md").write_text("\n".join(lines))
report([dest / "quality-up-moe.json", dest / "quality-up-scratch.json"], dest,
       note="**[10] parts 2 and 7 on the CPU.** The upcycled MoE and its scratch twin of scripts/cpu/upcycled.sh "
            "(2 CPU cores; command, commit and date in each section): MoLAE with G = 1 (`molae-alloc`) and G per "
            "layer (`molae-alloc-g`) against SVD, no healing, the same calibration and held-out windows. "
            "See README.md.")
print(f"wrote analysis.md and quality.{{json,md,png}} under {dest}")
