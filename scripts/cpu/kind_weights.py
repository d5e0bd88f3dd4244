"""[10] A test of one explanation of MoLAE's unhealed 25% loss to SVD (results/scratch/mixtral/README.md): that the
budget allocation, which sums each kind's relative error as equals, starves the gate. Converts one model at one
budget with the kinds' relative errors weighted (a weight w on a kind divides its energy by w in
factorize.allocate_latent's items: its dimensions count w times as much), or normalised by a power of the energy,
and scores each on held-out windows:
    python scripts/cpu/kind_weights.py MODEL DATA BUDGET OUT.json
(a CPU reference of scripts/cpu/peers.sh or along_training.sh; 32,768 calibration and 65,536 held-out tokens of 256)."""

import json
import sys
from pathlib import Path

import molae.convert as C
from molae.bench.quality import score
from molae.convert import ConvertOptions, convert_checkpoint
from molae.data import TokenData
from molae.evaluate import paired_change
from molae.factorize import allocate_latent

WEIGHTS = {"svd": None, "equal": {}, "gate x2": {"gate": 2.0}, "gate x4": {"gate": 4.0},
           "gate, up x2": {"gate": 2.0, "up": 2.0}, "down x2": {"down": 2.0},
           # how the errors are normalised: energy**p in place of energy (p = 1 relative, as allocate_latent does;
           # p = 0 absolute whitened error; p = 0.5 between)
           "energy^0.5": {"p": 0.5}, "energy^0": {"p": 0.0}}

src, data, budget, out = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
windows = TokenData(data).val_windows(256, 65536)
weights = {}
C.allocate_latent = lambda items, b, step=1: allocate_latent(  # noqa: E731
    {k: dict(it, energy=it["energy"] ** weights.get("p", 1.0) / weights.get(k[1], 1.0)) for k, it in items.items()},
    b, step)
original = score(src, windows, 1, "cpu")
rows = {}
for name, w in WEIGHTS.items():
    weights.clear()
    weights.update(w or {})
    opts = ConvertOptions(budget=budget, projections=("gate", "up", "down"), calibration=str(data),
                          calib_tokens=32768, calib_seq_len=256, **({"method": "svd"} if w is None else {}))
    summary = convert_checkpoint(src, out.parent / f".kind-weights-{name.replace(' ', '')}", opts, overwrite=True)
    r = score(out.parent / f".kind-weights-{name.replace(' ', '')}", windows, 1, "cpu")
    c, lo, hi = paired_change(r["window_nll"], (rows.get("svd") or r)["window_nll"])
    rows[name] = dict(r, weights=w, latent=sorted({(x["kind"], x["latent_dim"]) for x in summary["layers"]
                                                    if x.get("latent_dim")}), vs_svd=[c, lo, hi],
                      stored=summary["after"]["expert_stored"])
    print(f"{name:12s} perplexity {r['perplexity']:.3f} ({100 * (r['perplexity'] / original['perplexity'] - 1):+.2f}%)"
          f" against SVD {100 * c:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]; latent sizes {rows[name]['latent']}")
out.write_text(json.dumps(dict(model=str(src), budget=budget, original=original["perplexity"],
                               runs={k: {x: v for x, v in r.items() if x != "window_nll"} for k, r in rows.items()}),
                          indent=1) + "\n")
