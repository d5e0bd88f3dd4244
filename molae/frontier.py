"""[11] MoLAE against standard MoE on a loss-versus-parameters frontier, trained from scratch.

The plan (FRONTIER) is declarative: per shape, a base preset (train/config.py: frontier-nm, n = m; frontier-n4m,
n = 4m) and named variants as `--set` overrides. Standard MoEs vary the expert count E (a shape's n/m is the
point of having two shapes, so m stays), MoLAE varies the latent d at the base E (up+gate, and all three
projections at one d), LatentMoE runs at one size; the main pair (`reference` MoE, middle MoLAE) and every
standard MoE have a second seed (the seed-1 sweep gives the slope a second, independent estimate).
Every seed-0 run sees the same batches in the same order. Batches are a function of (seed, step), so a second
seed draws both another initialisation and another data order, shared by every run of that seed.

run_frontier trains the variants one after another into OUT/SHAPE/NAME (a finished run is skipped, an
interrupted one resumed), so a background job collected across GPU calls can stop anywhere and continue.

fit_frontier fits validation loss = a_seed + b ln(P) over the standard MoEs (P: non-embedding parameters; one
intercept per seed, since a seed's data order moves all its runs alike) by least squares, and reads each other
run's equivalent standard-MoE size P' = exp((L - a_seed) / b), and its loss minus the reference MoE's at the same
seeds, with 95% intervals from the fit's posterior (the residual noise drawn with its degrees of freedom).
Active parameters are the same for every standard MoE of the sweep (E varies at fixed top-k), so they cannot be
fitted against; each run's active parameters and training FLOPs are reported.

A second reading fits the first-pass loss the same way (first_pass_loss): the training loss over the last third of
the first pass over the training split, tokens no run has seen before, from the same files as training (the
validation split is other packages: a shifted distribution) and about a hundred times more of them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

FRONTIER: dict[str, dict] = {
    "n=m": dict(base="frontier-nm", reference="moe-e16", variants={
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
        "moe-e4-seed1": ["molae=null", "model.num_experts=4", "seed=1"],
        "moe-e8-seed1": ["molae=null", "model.num_experts=8", "seed=1"],
        "moe-e32-seed1": ["molae=null", "model.num_experts=32", "seed=1"],
    }),
    "n=4m": dict(base="frontier-n4m", reference="moe-e32", variants={
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
        "moe-e8-seed1": ["molae=null", "model.num_experts=8", "seed=1"],
        "moe-e16-seed1": ["molae=null", "model.num_experts=16", "seed=1"],
        "moe-e64-seed1": ["molae=null", "model.num_experts=64", "seed=1"],
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
    """{variant: summary.json} of the finished runs under out/SHAPE/, each with `load_imbalance`: the last
    logged mean over MoE layers of the busiest expert's load over the mean load (None without a log)."""
    from .train import read_log

    runs = {}
    for p in sorted((Path(out) / shape_dir(shape)).glob("*/summary.json")):
        log = read_log(p.parent / "log.jsonl") if (p.parent / "log.jsonl").exists() else []
        loads = [r["load_imbalance"] for r in log if r.get("load_imbalance")]
        runs[p.parent.name] = {**json.loads(p.read_text()), "load_imbalance": loads[-1] if loads else None, "log": log}
    return runs


def first_pass_loss(log: list[dict], train_tokens: int, start: float = 2 / 3) -> tuple[float, int] | None:
    """(mean training loss, tokens) over the logged windows (each the mean of its steps' losses) that lie inside
    [start, 1] of the first pass over a training split of train_tokens: tokens the model meets for the first time,
    so an in-distribution held-out loss, read at a point of the schedule every run of a plan shares. None when no
    window lies there (a run shorter than the pass, or a log too sparse)."""
    recs = [r for r in log if "loss" in r and r.get("tokens") and "event" not in r]
    inside = [(b["loss"], b["tokens"] - a["tokens"]) for a, b in zip(recs, recs[1:])
              if a["tokens"] >= start * train_tokens and b["tokens"] <= train_tokens]
    if not inside:
        return None
    tokens = sum(t for _, t in inside)
    return sum(loss * t for loss, t in inside) / tokens, tokens


def base_name(name: str) -> str:
    return name.split("-seed")[0]


def _ols(X: np.ndarray, y: np.ndarray):
    """y = X coef + noise: coef, (X'X)^-1 (the covariance per unit noise variance), the residual standard deviation
    and its degrees of freedom (nan and 0 when the points do not over-determine the fit)."""
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(y) - X.shape[1]
    s2 = float(((y - X @ coef) ** 2).sum() / dof) if dof > 0 else float("nan")
    return coef, np.linalg.pinv(X.T @ X), math.sqrt(s2) if dof > 0 else float("nan"), dof


def seed_noise(runs: dict[str, dict], metric: str = "final_val_loss") -> tuple[float | None, int]:
    """The standard deviation of one run's final loss from runs that differ only in seed (pooled), and the
    number of such pairs; None without any."""
    pairs = [(runs[base_name(n)][metric], r[metric]) for n, r in runs.items()
             if "-seed" in n and base_name(n) in runs]
    if not pairs:
        return None, 0
    return math.sqrt(sum((a - b) ** 2 / 2 for a, b in pairs) / len(pairs)), len(pairs)


def _seed(r: dict) -> int:
    return int(r["config"]["seed"])


def _posterior(coef, unit_cov, resid: float, dof: int, draws: int, rng):
    """Draws of (noise sd [draws], coefficients [draws, p]) of a least-squares fit: sigma ~ resid sqrt(dof /
    chi2(dof)), coef | sigma ~ N(coef, sigma^2 (X'X)^-1); the point fit itself, noise 0, without dof."""
    if dof <= 0:
        return np.zeros(draws), np.tile(coef, (draws, 1))
    sig = resid * np.sqrt(dof / rng.chisquare(dof, size=draws))
    chol = np.linalg.cholesky(unit_cov + 1e-12 * np.eye(len(coef)))
    return sig, coef + sig[:, None] * (rng.standard_normal((draws, len(coef))) @ chol.T)


def _equivalent(own: list[dict], coef, sig, coefs, a_of: dict, rng, metric: str) -> dict:
    """A variant's equivalent standard-MoE size from its runs `own` (each read against its seed's intercept,
    ln P' averaged over seeds), with the 95% interval of the posterior draws (the fit's, and each run's noise)."""
    Ls = np.array([r[metric] for r in own])
    idx = [a_of[_seed(r)] for r in own]
    eq = math.exp(float(np.mean((Ls - coef[idx]) / coef[-1])))
    noisy = Ls[None, :] + sig[:, None] * rng.standard_normal((len(sig), len(own)))
    lo, hi = np.exp(np.percentile(((noisy - coefs[:, idx]) / coefs[:, -1:]).mean(1), [2.5, 97.5]))
    p = own[0]["params"]["non_embedding"]
    return dict(loss=float(Ls.mean()), seeds=len(own), params=p, equivalent=eq, equivalent_95=[float(lo), float(hi)],
                ratio=eq / p, ratio_95=[float(lo) / p, float(hi) / p])


def _against(own: list[dict], ref: dict[int, float], sig, rng, metric: str) -> dict | None:
    """Loss minus the reference's at each shared seed, their mean and its 95% interval (a difference carries two
    runs' noise; the mean over k seeds sqrt(2 / k) of one run's); None without a shared seed."""
    diffs = [r[metric] - ref[_seed(r)] for r in own if _seed(r) in ref]
    if not diffs:
        return None
    d = float(np.mean(diffs))
    lo, hi = np.percentile(sig * math.sqrt(2 / len(diffs)) * rng.standard_normal(len(sig)), [2.5, 97.5])
    return dict(diff=d, per_seed=diffs, diff_95=[d + float(lo), d + float(hi)])


def fit_frontier(runs: dict[str, dict], draws: int = 20000, seed: int = 0, reference: str | None = None,
                 metric: str = "final_val_loss") -> dict:
    """The standard-MoE fit and every other variant's equivalent MoE size and paired difference (module notes).

    loss = a_seed + b ln(P): one intercept per seed, because a seed fixes the data order (and the initial draws)
    of every run that carries it (results/pretrain_frontier.md: both seed-1 runs of n = m's main pair land
    0.011-0.016 below their seed-0 twins, as far apart as the sizes of the sweep). A variant's run at seed s is
    read against a_s. The noise left after size and seed (the fit's residual sd, with dof degrees of freedom) is
    every run's own noise; the intervals draw it from its scaled-inverse-chi-square posterior, so few degrees of
    freedom give wide (t-like) intervals.
    `reference` (a standard MoE of the plan): each variant's loss minus the reference's at the same seeds.
    `metric`: the runs' key fitted (final_val_loss; frontier_report adds first_pass_loss); runs without it are left
    out."""
    runs = {n: r for n, r in runs.items() if r.get(metric) is not None}
    moe = {n: r for n, r in runs.items() if base_name(n).startswith("moe-")}
    if len({base_name(n) for n in moe}) < 3:
        raise ValueError(f"the fit needs standard MoEs of at least three sizes; finished: {sorted(moe) or 'none'}")
    seeds = sorted({_seed(r) for r in moe.values()})
    a_of = {s: i for i, s in enumerate(seeds)}  # seed -> its intercept's column
    X = np.array([[float(_seed(r) == s) for s in seeds] + [math.log(r["params"]["non_embedding"])]
                  for r in moe.values()])
    coef, unit_cov, resid, dof = _ols(X, np.array([r[metric] for r in moe.values()], float))
    rng = np.random.default_rng(seed)
    sig, coefs = _posterior(coef, unit_cov, resid, dof, draws, rng)
    b_lo, b_hi = np.percentile(coefs[:, -1], [2.5, 97.5])
    seed_sd, n_pairs = seed_noise(runs, metric)
    out = dict(a={str(s): float(coef[i]) for s, i in a_of.items()}, b=float(coef[-1]), b_95=[float(b_lo), float(b_hi)],
               residual_sd=resid, dof=dof, points=len(moe), seed_sd=seed_sd, seed_pairs=n_pairs,
               parameter_limited=bool(b_hi < 0), reference=reference, metric=metric, equivalents={})
    ref = {_seed(r): r[metric] for n, r in runs.items() if base_name(n) == reference}
    for name in dict.fromkeys(base_name(n) for n in runs if not base_name(n).startswith("moe-")):
        own = [r for n, r in runs.items() if base_name(n) == name and _seed(r) in a_of]
        if not own:
            continue  # no standard MoE at its seeds: nothing to read it against
        e = _equivalent(own, coef, sig, coefs, a_of, rng, metric)
        if (v := _against(own, ref, sig, rng, metric)) is not None:
            e["vs_reference"] = v
        out["equivalents"][name] = e
    return out


READINGS = {"final_val_loss": "validation loss", "first_pass_loss": "first-pass loss"}


def batch_runs(log: str) -> list[str]:
    """The runs a GPU batch trained ("SHAPE/VARIANT"), from frontier.sh's log (its "nm/moe-e4: ... final
    validation loss" lines)."""
    return [m.group(1) for m in re.finditer(r"^(\w+/[\w.-]+): .*final validation loss", log, re.M)]


def frontier_report(out: Path, shapes: list[str], dest: Path, batches: list[dict], notes: str = "",
                    manifest: Path | None = None, conclusion: str | None = None) -> dict:
    """pretrain_frontier.{json,md,png} under dest from the finished runs under out. `batches`: the GPU batches
    that trained them, each {commit, device, date, command, runs} (runs: "SHAPE/VARIANT"s); `manifest` (the
    data's manifest.json) adds each run's passes over the training split and its first-pass loss; `conclusion`
    (markdown prose) writes dest/pretrain.md: the verdict table generated from the fits, then the prose."""
    from .checkpoint import write_json_atomically, write_text_atomically

    train_tokens = json.loads(Path(manifest).read_text())["tokens"]["train"] if manifest else None
    result = dict(batches=batches, train_tokens=train_tokens, shapes={})
    for shape in shapes:
        runs = load_runs(out, shape)
        for r in runs.values():
            fp = first_pass_loss(r["log"], train_tokens) if train_tokens else None
            r["first_pass_loss"], r["first_pass_tokens"] = fp if fp else (None, None)
        rows = {n: dict(params=r["params"], tokens=r["tokens"],
                        tokens_per_param=r["tokens"] / r["params"]["non_embedding"], final_val_loss=r["final_val_loss"],
                        val_tokens=r.get("val_tokens"), first_pass_loss=r["first_pass_loss"],
                        first_pass_tokens=r["first_pass_tokens"], train_flops=r["train_flops"],
                        tokens_per_s=r["tokens_per_s"], peak_memory_gb=r.get("peak_memory_gb"),
                        skipped_steps=r.get("skipped_steps", 0), seed=_seed(r),
                        passes=r["tokens"] / train_tokens if train_tokens else None,
                        load_imbalance=r.get("load_imbalance"))
                for n, r in runs.items()}
        fits = {}
        for metric in READINGS:
            try:
                fits[metric] = fit_frontier(runs, reference=FRONTIER[shape].get("reference"), metric=metric)
            except ValueError as e:
                fits[metric] = dict(error=str(e), metric=metric)
        result["shapes"][shape] = dict(base=FRONTIER[shape]["base"], runs=rows, fit=fits["final_val_loss"],
                                       fit_first_pass=fits["first_pass_loss"])
    dest.mkdir(parents=True, exist_ok=True)
    write_json_atomically(dest / "pretrain_frontier.json", result)
    write_text_atomically(dest / "pretrain_frontier.md", frontier_markdown(result) + (f"\n{notes}" if notes else ""))
    plot_frontier(result, dest / "pretrain_frontier.png")
    if conclusion is not None:
        write_text_atomically(dest / "pretrain.md", conclusion_markdown(result) + f"\n{conclusion}")
    return result


def verdict(ratio_95: list[float]) -> str:
    """What an equivalent-size interval (equivalent / own parameters) says."""
    lo, hi = ratio_95
    return "saves parameters" if lo > 1 else "needs more parameters" if hi < 1 else "tied (interval includes 1)"


def conclusion_markdown(result: dict) -> str:
    """The table behind [11]'s answer: every non-standard run's equivalent standard-MoE size on both readings."""
    lines = ["# [11] Does MoLAE trained from scratch save parameters at equal loss?", "",
             "The table is generated from [pretrain_frontier.json](pretrain_frontier.json) by `python -m "
             "molae.experiments frontier ... --conclusion FILE` (runs, fits, commands, devices and commits: "
             "[pretrain_frontier.md](pretrain_frontier.md)); the reading below it is FILE. Equivalent / own: the "
             "size of the standard MoE that the fit says reaches the run's loss, over the run's own non-embedding "
             "parameters, with its 95% interval.", "",
             "| shape | run | non-emb params | of the reference MoE's | equivalent / own, validation [95%] | "
             "reading | equivalent / own, first pass [95%] | reading |", "|---|---|---:|---:|---:|---|---:|---|"]
    for shape, s in result["shapes"].items():
        ref = s["fit"].get("reference") or s.get("fit_first_pass", {}).get("reference")
        ref_p = s["runs"][ref]["params"]["non_embedding"] if ref in s["runs"] else None
        fits = [s["fit"].get("equivalents", {}), s.get("fit_first_pass", {}).get("equivalents", {})]
        for name in dict.fromkeys([*fits[0], *fits[1]]):
            cells = []
            for eqs in fits:
                e = eqs.get(name)
                lo, hi = e["ratio_95"] if e else (None, None)
                cells += [f"{e['ratio']:.2f}x [{lo:.2f}, {hi:.2f}]", verdict([lo, hi])] if e else ["", ""]
            p = (fits[0].get(name) or fits[1][name])["params"]
            share = f"{100 * p / ref_p:.0f}% of {ref}" if ref_p else ""
            lines.append(f"| {shape} | {name} | {p / 1e6:.2f}M | {share} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _batch_lines(batches: list[dict]) -> list[str]:
    lines = []
    for b in batches:
        runs = ", ".join(b["runs"]) if b.get("runs") else "every run"
        lines.append(f"- Commit `{b['commit']}`, {b['device']}, {b['date']}: `{b['command']}` ({runs}).")
    return lines


def _fit_lines(f: dict, what: str) -> list[str]:
    """A fit's line and its table of equivalent sizes and paired differences."""
    if "error" in f:
        return ["", f"No fit of the {what}: {f['error']}.", ""]
    noise = (f"seed noise {f['seed_sd']:.4f} nats (pooled from {f['seed_pairs']} pair(s) of seeds, shared by "
             "every run of a seed, so the fit takes it out)" if f["seed_sd"] is not None else "one seed")
    icpt = ", ".join(f"a_{s_} = {a:.4f}" for s_, a in f["a"].items())
    ref = f.get("reference")
    lines = ["", f"Fit of the {what} over the standard MoEs ({f['points']} runs): {what} = a_seed "
             f"{'-' if f['b'] < 0 else '+'} {abs(f['b']):.4f} ln(P) ({icpt}), "
             f"b 95% [{f['b_95'][0]:.4f}, {f['b_95'][1]:.4f}], residual sd {f['residual_sd']:.4f} "
             f"({f['dof']} degrees of freedom); {noise}. "
             f"Parameter-limited (b's interval below zero: larger MoEs lower the loss): "
             f"{'yes' if f['parameter_limited'] else 'no'}.", "",
             f"| run | non-emb params | {what} (seeds) | equivalent standard MoE [95%] | "
             f"equivalent / own params | {what} - {ref or 'reference'} at the same seeds [95%] |",
             "|---|---:|---:|---:|---:|---:|"]
    for n, e in f["equivalents"].items():
        lo, hi = (v / 1e6 for v in e["equivalent_95"])
        v = e.get("vs_reference")
        vs = (f"{v['diff']:+.4f} [{v['diff_95'][0]:+.4f}, {v['diff_95'][1]:+.4f}]" if v else "")
        lines.append(f"| {n} | {e['params'] / 1e6:.2f}M | {e['loss']:.4f} ({e['seeds']}) | "
                     f"{e['equivalent'] / 1e6:.2f}M [{lo:.2f}, {hi:.2f}] | {e['ratio']:.2f}x "
                     f"[{e['ratio_95'][0]:.2f}, {e['ratio_95'][1]:.2f}] | {vs} |")
    return lines


def frontier_markdown(result: dict) -> str:
    lines = ["# [11] Pretraining frontier: validation loss against parameters, MoLAE against standard MoE", "",
             "Runs from these GPU batches (their commands, with `bash scripts/gpu/bg.sh wait frontier` calls to "
             "collect them):", *_batch_lines(result["batches"]),
             "Every run of a shape: the same preset, steps and batches (molae/frontier.py has the plan and the fit). "
             "Validation loss: the held-out packages (a different distribution from training). First-pass loss: the "
             "training loss over the last third of the first pass over the training split, tokens no run had seen "
             "(molae/frontier.py: first_pass_loss).", ""]
    for shape, s in result["shapes"].items():
        lines += [f"## {shape} (`{s['base']}`)", "",
                  "| run | non-emb params | active | tokens / non-emb param | passes over the data | val loss | "
                  "first-pass loss | busiest expert / mean load | train FLOPs | tokens/s | peak GB | skipped |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, r in sorted(s["runs"].items(), key=lambda kv: kv[1]["params"]["non_embedding"]):
            lines.append(f"| {n} | {r['params']['non_embedding'] / 1e6:.2f}M | {r['params']['active'] / 1e6:.2f}M | "
                         f"{r['tokens_per_param']:.0f} | {_cell(r.get('passes'), '.2f')} | "
                         f"{r['final_val_loss']:.4f} | {_cell(r.get('first_pass_loss'), '.4f')} | "
                         f"{_cell(r.get('load_imbalance'), '.2f')} | {r['train_flops']:.3g} | "
                         f"{r['tokens_per_s']:,.0f} | {_cell(r['peak_memory_gb'], '.1f')} | {r['skipped_steps']} |")
        toks = sorted({(r.get("val_tokens"), r.get("first_pass_tokens")) for r in s["runs"].values()}, key=str)
        lines += ["", "Tokens behind each run's loss (validation, first pass): "
                  + "; ".join(f"{_cell(v, ',')} and {_cell(t, ',')}" for v, t in toks) + "."]
        lines += _fit_lines(s["fit"], "validation loss")
        lines += _fit_lines(s.get("fit_first_pass", dict(error="not computed")), "first-pass loss")
        lines += ["", "A ratio above 1 whose interval excludes 1: the run matches a standard MoE larger than itself "
                  "(it saves parameters at equal loss); below 1: it needs more.", ""]
    return "\n".join(lines) + "\n"


def plot_frontier(result: dict, path: Path):
    """One column per shape; rows: validation loss, first-pass loss (each with its fit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    shapes = list(result["shapes"].items())
    fig, axes = plt.subplots(2, len(shapes), figsize=(6.5 * len(shapes), 9), squeeze=False)
    for col, (shape, s) in enumerate(shapes):
        for ax, (metric, what), f in zip(axes[:, col], READINGS.items(), (s["fit"], s.get("fit_first_pass", {}))):
            _plot_reading(ax, s, metric, f, f"{shape} ({s['base']}): {what}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_reading(ax, s: dict, metric: str, f: dict, title: str):
    import matplotlib.ticker

    runs = {n: r for n, r in s["runs"].items() if r.get(metric) is not None}
    for n, r in runs.items():
        moe = base_name(n).startswith("moe-")
        ax.plot(r["params"]["non_embedding"] / 1e6, r[metric], "ks" if moe else "o", ms=6,
                mfc="none" if moe and r["seed"] else None, label=None if moe else n)  # open: seed 1
    if runs and "error" not in f:
        P = np.geomspace(min(r["params"]["non_embedding"] for r in runs.values()),
                         max(r["params"]["non_embedding"] for r in runs.values()), 50)
        for (s_, a), style in zip(f["a"].items(), ["k--", "k:", "k-."]):
            ax.plot(P / 1e6, a + f["b"] * np.log(P), style, lw=1, label=f"standard MoE fit, seed {s_}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel(READINGS[metric])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
