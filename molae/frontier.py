"""[11] MoLAE against standard MoE on a loss-versus-parameters frontier, trained from scratch.

The plan (FRONTIER) is declarative: per shape, a base preset (train/config.py: frontier-nm, n = m; frontier-n4m,
n = 4m) and named variants as `--set` overrides. Standard MoEs vary the expert count E (a shape's n/m is the
point of having two shapes, so m stays), MoLAE varies the latent d at the base E (up+gate, and all three
projections at one d), LatentMoE runs at one size, and the main pair (base MoE, middle MoLAE) has a second seed.
Every seed-0 run sees the same batches in the same order. Batches are a function of (seed, step), so a second
seed draws both another initialisation and another data order: the variation a seed interval should cover.

run_frontier trains the variants one after another into OUT/SHAPE/NAME (a finished run is skipped, an
interrupted one resumed), so a background job collected across GPU calls can stop anywhere and continue.

fit_frontier fits validation loss = a + b ln(P) over the standard MoEs (P: non-embedding parameters; every seed
a point) by least squares, and reads each other run's equivalent standard-MoE size P' = exp((L - a) / b) with a
95% interval from a parametric bootstrap over the fit's covariance and the seed noise of L (estimated from the
runs that differ only in seed). Active parameters are the same for every standard MoE of the sweep (E varies at
fixed top-k), so they cannot be fitted against; each run's active parameters and training FLOPs are reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

FRONTIER: dict[str, dict] = {
    "n=m": dict(base="frontier-nm", variants={
        "moe-e4": ["molae=null", "model.num_experts=4"],
        "moe-e8": ["molae=null", "model.num_experts=8"],
        "moe-e16": ["molae=null"],
        "moe-e32": ["molae=null", "model.num_experts=32"],
        "molae-d48": ["molae.latent_dim=48"],
        "molae-d96": ["molae.latent_dim=96"],
        "molae-d144": ["molae.latent_dim=144"],
        "molae-all-d96": ["molae.latent_dim=96", 'molae.projections=["gate","up","down"]'],
        "latentmoe-l96": ["molae.latent_moe_dim=96", "model.num_experts=32", "model.num_experts_per_tok=4"],
        "moe-e16-seed1": ["molae=null", "seed=1"],
        "molae-d96-seed1": ["molae.latent_dim=96", "seed=1"],
    }),
    "n=4m": dict(base="frontier-n4m", variants={
        "moe-e8": ["molae=null", "model.num_experts=8"],
        "moe-e16": ["molae=null", "model.num_experts=16"],
        "moe-e32": ["molae=null"],
        "moe-e64": ["molae=null", "model.num_experts=64"],
        "molae-d32": ["molae.latent_dim=32"],
        "molae-d64": ["molae.latent_dim=64"],
        "molae-d128": ["molae.latent_dim=128"],
        "molae-all-d64": ["molae.latent_dim=64", 'molae.projections=["gate","up","down"]'],
        "latentmoe-l128": ["molae.latent_moe_dim=128", "model.num_experts=64", "model.num_experts_per_tok=8"],
        "moe-e32-seed1": ["molae=null", "seed=1"],
        "molae-d64-seed1": ["molae.latent_dim=64", "seed=1"],
    }),
}


def shape_dir(shape: str) -> str:
    return shape.replace("=", "")  # "n=4m" -> "n4m"


def variant_config(shape: str, name: str, steps: int | None = None, overrides: list[str] | None = None):
    """The variant's TrainConfig; overrides (KEY=VALUE, e.g. compile_mode=reduce-overhead) go last, for every
    variant alike (how it runs, not what it is: the plan's own differences stay the only ones between runs)."""
    from .train import apply_overrides, load_config

    plan = FRONTIER[shape]
    cfg = apply_overrides(load_config(plan["base"]), plan["variants"][name])
    return apply_overrides(cfg, [f"name={plan['base']}-{name}"] + ([f"steps={steps}"] if steps else [])
                           + list(overrides or []))


def run_frontier(shape: str, data, out: Path, steps: int | None = None, only: list[str] | None = None,
                 progress: bool = True, overrides: list[str] | None = None) -> list[str]:
    """Train the shape's variants (or `only` those) into out/SHAPE/NAME: finished ones skipped, interrupted ones
    resumed. Returns the names trained or found finished."""
    from .train import train

    names = only or list(FRONTIER[shape]["variants"])
    unknown = [n for n in names if n not in FRONTIER[shape]["variants"]]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: not variants of {shape} (allowed "
                         f"{', '.join(FRONTIER[shape]['variants'])})")
    done = []
    for name in names:
        run = Path(out) / shape_dir(shape) / name
        if not (run / "summary.json").exists():
            s = train(variant_config(shape, name, steps, overrides), data, run, resume=(run / "checkpoint.pt").exists(),
                      progress=progress)
            print(f"{shape} {name}: final validation loss {s['final_val_loss']:.4f} after {s['tokens']:,} tokens; "
                  f"{s['tokens_per_s']:,.0f} tokens/s; {s['params']['non_embedding'] / 1e6:.2f}M non-embedding")
        done.append(name)
    return done


def load_runs(out: Path, shape: str) -> dict[str, dict]:
    """{variant: summary.json} of the finished runs under out/SHAPE/."""
    runs = {}
    for p in sorted((Path(out) / shape_dir(shape)).glob("*/summary.json")):
        runs[p.parent.name] = json.loads(p.read_text())
    return runs


def base_name(name: str) -> str:
    return name.split("-seed")[0]


def _ols(x: np.ndarray, y: np.ndarray):
    """y = a + b x: (a, b), their covariance, the residual standard deviation."""
    X = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(x) - 2
    s2 = float(((y - X @ coef) ** 2).sum() / dof) if dof > 0 else float("nan")
    return coef, s2 * np.linalg.inv(X.T @ X), math.sqrt(s2) if dof > 0 else float("nan")


def seed_noise(runs: dict[str, dict]) -> tuple[float | None, int]:
    """The standard deviation of one run's final loss from runs that differ only in seed (pooled), and the
    number of such pairs; None without any."""
    pairs = [(runs[base_name(n)]["final_val_loss"], r["final_val_loss"]) for n, r in runs.items()
             if "-seed" in n and base_name(n) in runs]
    if not pairs:
        return None, 0
    return math.sqrt(sum((a - b) ** 2 / 2 for a, b in pairs) / len(pairs)), len(pairs)


def fit_frontier(runs: dict[str, dict], draws: int = 20000, seed: int = 0) -> dict:
    """The standard-MoE fit and every other variant's equivalent MoE size (module notes)."""
    moe = {n: r for n, r in runs.items() if base_name(n).startswith("moe-")}
    P = np.array([r["params"]["non_embedding"] for r in moe.values()], float)
    L = np.array([r["final_val_loss"] for r in moe.values()], float)
    if len({base_name(n) for n in moe}) < 3:
        raise ValueError(f"the fit needs standard MoEs of at least three sizes; finished: {sorted(moe) or 'none'}")
    coef, cov, resid = _ols(np.log(P), L)
    sigma, n_pairs = seed_noise(runs)
    rng = np.random.default_rng(seed)
    ab = rng.multivariate_normal(coef, cov, size=draws) if np.isfinite(cov).all() else np.tile(coef, (draws, 1))
    b_lo, b_hi = np.percentile(ab[:, 1], [2.5, 97.5])
    out = dict(a=float(coef[0]), b=float(coef[1]), b_95=[float(b_lo), float(b_hi)], residual_sd=resid,
               points=len(P), seed_sd=sigma, seed_pairs=n_pairs, parameter_limited=bool(b_hi < 0), equivalents={})
    for name in dict.fromkeys(base_name(n) for n in runs if not base_name(n).startswith("moe-")):
        seeds = [r for n, r in runs.items() if base_name(n) == name]
        loss = float(np.mean([r["final_val_loss"] for r in seeds]))
        Ls = loss + (sigma or 0.0) / math.sqrt(len(seeds)) * rng.standard_normal(draws)
        lnP = (Ls - ab[:, 0]) / ab[:, 1]
        p = seeds[0]["params"]["non_embedding"]
        eq = math.exp((loss - coef[0]) / coef[1])
        lo, hi = np.exp(np.percentile(lnP, [2.5, 97.5]))
        out["equivalents"][name] = dict(loss=loss, seeds=len(seeds), params=p, equivalent=eq,
                                        equivalent_95=[float(lo), float(hi)], ratio=eq / p,
                                        ratio_95=[float(lo) / p, float(hi) / p])
    return out


def frontier_report(out: Path, shapes: list[str], dest: Path, commit: str, device: str, date: str,
                    command: str, notes: str = "") -> dict:
    """pretrain_frontier.{json,md,png} under dest from the finished runs under out."""
    from .checkpoint import write_json_atomically, write_text_atomically

    result = dict(commit=commit, device=device, date=date, command=command, shapes={})
    for shape in shapes:
        runs = load_runs(out, shape)
        rows = {n: dict(params=r["params"], tokens=r["tokens"],
                        tokens_per_param=r["tokens"] / r["params"]["non_embedding"], final_val_loss=r["final_val_loss"],
                        train_flops=r["train_flops"], tokens_per_s=r["tokens_per_s"],
                        peak_memory_gb=r.get("peak_memory_gb"), skipped_steps=r.get("skipped_steps", 0),
                        seed=r["config"]["seed"]) for n, r in runs.items()}
        try:
            fit = fit_frontier(runs)
        except ValueError as e:
            fit = dict(error=str(e))
        result["shapes"][shape] = dict(base=FRONTIER[shape]["base"], runs=rows, fit=fit)
    dest.mkdir(parents=True, exist_ok=True)
    write_json_atomically(dest / "pretrain_frontier.json", result)
    write_text_atomically(dest / "pretrain_frontier.md", frontier_markdown(result) + (f"\n{notes}" if notes else ""))
    plot_frontier(result, dest / "pretrain_frontier.png")
    return result


def frontier_markdown(result: dict) -> str:
    lines = ["# [11] Pretraining frontier: validation loss against parameters, MoLAE against standard MoE", "",
             f"Commit `{result['commit']}`, {result['device']}, {result['date']}. Command: `{result['command']}`.",
             "Every run of a shape: the same preset, steps and batches (molae/frontier.py has the plan and the fit).",
             ""]
    for shape, s in result["shapes"].items():
        lines += [f"## {shape} (`{s['base']}`)", "",
                  "| run | non-emb params | active | tokens / non-emb param | val loss | train FLOPs | tokens/s | "
                  "peak GB | skipped |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, r in sorted(s["runs"].items(), key=lambda kv: kv[1]["params"]["non_embedding"]):
            gb = "" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
            lines.append(f"| {n} | {r['params']['non_embedding'] / 1e6:.2f}M | {r['params']['active'] / 1e6:.2f}M | "
                         f"{r['tokens_per_param']:.0f} | {r['final_val_loss']:.4f} | {r['train_flops']:.3g} | "
                         f"{r['tokens_per_s']:,.0f} | {gb} | {r['skipped_steps']} |")
        f = s["fit"]
        if "error" in f:
            lines += ["", f"No fit: {f['error']}.", ""]
            continue
        noise = (f"seed noise {f['seed_sd']:.4f} nats (from {f['seed_pairs']} pair(s) of seeds)" if f["seed_sd"]
                 is not None else "no seed pairs: the intervals hold the fit's error only")
        lines += ["", f"Fit over the standard MoEs ({f['points']} runs): loss = {f['a']:.4f} "
                  f"{'-' if f['b'] < 0 else '+'} {abs(f['b']):.4f} ln(P), "
                  f"b 95% [{f['b_95'][0]:.4f}, {f['b_95'][1]:.4f}], residual sd {f['residual_sd']:.4f}; {noise}. "
                  f"Parameter-limited (b's interval below zero: larger MoEs lower the loss): "
                  f"{'yes' if f['parameter_limited'] else 'no'}.", "",
                  "| run | non-emb params | val loss (seeds) | equivalent standard MoE [95%] | "
                  "equivalent / own params |",
                  "|---|---:|---:|---:|---:|"]
        for n, e in f["equivalents"].items():
            lo, hi = (v / 1e6 for v in e["equivalent_95"])
            lines.append(f"| {n} | {e['params'] / 1e6:.2f}M | {e['loss']:.4f} ({e['seeds']}) | "
                         f"{e['equivalent'] / 1e6:.2f}M [{lo:.2f}, {hi:.2f}] | {e['ratio']:.2f}x "
                         f"[{e['ratio_95'][0]:.2f}, {e['ratio_95'][1]:.2f}] |")
        lines += ["", "A ratio above 1 whose interval excludes 1: the run matches a standard MoE larger than itself "
                  "(it saves parameters at equal loss); below 1: it needs more.", ""]
    return "\n".join(lines) + "\n"


def plot_frontier(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(result["shapes"].items())
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.5), squeeze=False)
    for ax, (shape, s) in zip(axes[0], shapes):
        for n, r in s["runs"].items():
            moe = base_name(n).startswith("moe-")
            ax.plot(r["params"]["non_embedding"] / 1e6, r["final_val_loss"], "ks" if moe else "o", ms=6,
                    label=None if moe else n)
        f = s["fit"]
        if "error" not in f:
            P = np.geomspace(min(r["params"]["non_embedding"] for r in s["runs"].values()),
                             max(r["params"]["non_embedding"] for r in s["runs"].values()), 50)
            ax.plot(P / 1e6, f["a"] + f["b"] * np.log(P), "k--", lw=1, label="standard MoE fit")
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters (M)")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{shape} ({s['base']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
