"""[10] Why MoBE's low-rank form beats unhealed MoLAE at low budgets: a weight-space ablation.

    python scripts/cpu/mobe_ablation.py MODEL... --out results/mobe_ablation [--budgets 0.5,0.25] [--steps 2000]

For every layer and projection kind of each model's routed experts, at each budget (a fraction of the kind's
parameters), the relative Frobenius error ||W_hat - W|| / ||W|| (what MoBE fits; data-free, so every form is
scored the same way) of:
  mobe-silu      MoBE low-rank as `--method mobe-lowrank` writes it: W_i ~ A_i silu(sum_j softmax(w_i)_j B_j),
                 J = E/4 bases, k from the budget (methods/mobe.py, the authors' fit)
  mobe-linear    the same fit with the identity for SiLU: then A_i sum_j w_ij B_j lies in the span of the J k
                 basis rows, a MoLAE-like shared latent of width J k with a constrained per-expert matrix
  molae-G        MoLAE's data-free factorization with G = 1, J and E groups (E: per-expert SVD), d from the
                 budget (factorize.factorize_projection)
If the SiLU form wins and the linear one does not, what MoBE adds is the nonlinearity: each expert gets its own
rank-k basis silu(B~_i) for J numbers, which no shared linear latent can express at that price.
Writes OUT/mobe_ablation.{json,md}.
"""

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from molae.checkpoint import SourceCheckpoint
from molae.convert import find_expert_groups
from molae.factorize import factorize_projection
from molae.methods.mobe import divisors, mobe, variant_rank

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("models", nargs="+", type=Path)
p.add_argument("--out", type=Path, required=True)
p.add_argument("--budgets", default="0.5,0.25")
p.add_argument("--steps", type=int, default=2000, help="MoBE Adam steps (the authors' 30,000; peers.sh's 2,000)")
p.add_argument("--commit", default="unknown")
args = p.parse_args()
budgets = [float(b) for b in args.budgets.split(",")]
rows = []
for model in args.models:
    ckpt = SourceCheckpoint(model)
    for g in sorted(find_expert_groups(ckpt).values(), key=lambda g: g.layer):
        for kind in ("gate", "up", "down"):
            W = g.read_kind(ckpt, kind).double()  # [E, m, n] gate/up, [E, n, m] down
            fit = W.transpose(1, 2) if kind == "down" else W  # MoBE's A_i the smaller side, as convert does
            E, M, N = fit.shape
            J = max(j for j in divisors(E) if j <= max(1, E // 4))
            for f in budgets:
                row = dict(model=str(model), layer=g.layer, kind=kind, budget=f, E=E, M=M, N=N, J=J)
                k = variant_rank(f, E, M, N, J)
                for name, act in (("mobe-silu", torch.nn.functional.silu), ("mobe-linear", lambda x: x)):
                    torch.manual_seed(0)
                    _, stored, info = mobe(fit, J, k, steps=args.steps, act=act)
                    row[name] = info["rel_error"]
                    row[f"{name}-params"] = stored
                row["mobe-rank"] = k
                for G in sorted({1, J, E}):
                    d = int(f * E * M * N // (E * M + G * N))  # A [E, m, d] + B [G, d, n] within the budget
                    _, r = factorize_projection(W, kind, d, G)
                    row[f"molae-G{G}"], row[f"molae-G{G}-d"], row[f"molae-G{G}-params"] = r["rel_error"], d, \
                        r["params_after"]
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                      file=sys.stderr)
args.out.mkdir(parents=True, exist_ok=True)
meta = dict(command="python scripts/cpu/mobe_ablation.py " + " ".join(sys.argv[1:]), commit=args.commit,
            date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), device="CPU (2 cores)", steps=args.steps)
(args.out / "mobe_ablation.json").write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")
forms = ["mobe-silu", "mobe-linear", "molae-G1", "molae-GJ", "molae-GE"]
lines = ["# MoBE's nonlinearity, ablated: relative weight error per form ([10])", "",
         f"- command: `{meta['command']}`; {meta['device']}; {meta['date']}; commit `{meta['commit']}`; MoBE "
         f"{args.steps} Adam steps", "- cells: mean over layers of ||W_hat - W|| / ||W|| (data-free, as MoBE fits); "
         "GJ: G = J groups (MoBE's bases), GE: one latent per expert (SVD)", "",
         "| model | kind | budget | E, J | " + " | ".join(forms) + " |", "|---|---|---:|---|" + "---:|" * len(forms)]
for model in args.models:
    for kind in ("gate", "up", "down"):
        for f in budgets:
            rs = [r for r in rows if r["model"] == str(model) and r["kind"] == kind and r["budget"] == f]
            cells = []
            for name in forms:
                key = {"molae-GJ": lambda r: f"molae-G{r['J']}", "molae-GE": lambda r: f"molae-G{r['E']}"}.get(
                    name, lambda r, name=name: name)
                cells.append(f"{sum(r[key(r)] for r in rs) / len(rs):.4f}")
            lines.append(f"| {model.name if model.name != 'model' else model.parent.name} | {kind} | {100 * f:g}% | "
                         f"{rs[0]['E']}, {rs[0]['J']} | " + " | ".join(cells) + " |")
(args.out / "mobe_ablation.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
