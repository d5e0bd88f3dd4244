"""`molae analyze`: how redundant are a MoE checkpoint's experts? (the paper's motivation)

For each MoE layer and projection kind, every expert matrix is taken as [m, n] (down
transposed), so that all kinds live in the n-dimensional row space a shared B spans:
- each expert's singular values; its effective rank at 90/95/99% of its energy;
- the energy of the group's row-stacked matrix kept by the best latent of size d, for G = 1
  and a few larger G (what `molae convert` keeps before any data-aware fitting), and the
  smallest d that keeps 90/95/99%;
- overlap of experts' row spaces: for experts i, j with top-k_i, top-k_j right singular
  vectors V_i, V_j (k at 90% energy), ||V_i^T V_j||_F^2 / min(k_i, k_j), averaged over
  pairs; random subspaces give about max(k_i, k_j) / n.
Weights are streamed from the checkpoint one layer and kind at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, SourceCheckpoint, check_destination, publish, removed_on_error, resolve,
                         temp_dir_for)
from .command import progress_bar
from .convert import check_not_molae, find_expert_groups, parse_layers
from .factorize import right_singular
from .layers import KINDS, check_projections

LEVELS = (0.90, 0.95, 0.99)
CURVE_POINTS = 64


def rank_at(energy_cum: torch.Tensor, level: float) -> int:
    """Smallest r with cumulative energy share >= level (energy_cum: cumulative shares, ascending)."""
    query = torch.tensor(level - 1e-12, dtype=energy_cum.dtype, device=energy_cum.device)
    return int(torch.searchsorted(energy_cum, query).item()) + 1


def cumulative_share(S: torch.Tensor) -> torch.Tensor:
    e = S.double().square()
    return e.cumsum(-1) / e.sum(-1, keepdim=True).clamp_min(1e-300)


def group_candidates(E: int) -> list[int]:
    """G = 1, 2, 4, 8 where they divide E, and G = E (one expert per group: per-expert SVD)."""
    return sorted({g for g in (1, 2, 4, 8, E) if E % g == 0})


def analyze_projection(W_EMN: torch.Tensor) -> dict:
    """The figures above for one layer and kind; W [E, m, n] in float32 or float64."""
    E, M, N = W_EMN.shape
    W = W_EMN.double() if W_EMN.dtype == torch.float64 else W_EMN.float()
    # per expert: singular values and top right singular vectors, via the smaller Gram matrix
    S_list, V_list, ranks = [], [], {lv: [] for lv in LEVELS}
    for i in range(E):
        S, Vh = right_singular(W[i], method="svd" if min(M, N) <= 1024 else "gram")
        cum = cumulative_share(S)
        for lv in LEVELS:
            ranks[lv].append(rank_at(cum, lv))
        S_list.append(S.double().cpu())
        V_list.append(Vh[:ranks[0.90][-1]].double())
    overlap, baseline, pairs = 0.0, 0.0, 0
    for i in range(E):
        for j in range(i + 1, E):
            ki, kj = V_list[i].shape[0], V_list[j].shape[0]
            overlap += (V_list[i] @ V_list[j].T).square().sum().item() / min(ki, kj)
            baseline += max(ki, kj) / N
            pairs += 1
    curves, d_at = {}, {}
    for G in group_candidates(E):
        Eg = E // G
        kept = None
        for g in range(G):
            S, _ = right_singular(W[g * Eg:(g + 1) * Eg].reshape(Eg * M, N))
            e = S.double().square().cpu()
            kept = e.cumsum(0) if kept is None else kept + e.cumsum(0)[:len(kept)]
        share = kept / kept[-1]
        idx = sorted({min(len(share), max(1, round(x))) for x in torch.linspace(1, len(share), CURVE_POINTS).tolist()})
        curves[str(G)] = dict(d=idx, energy=[share[d - 1].item() for d in idx])
        d_at[str(G)] = {f"{int(lv * 100)}": rank_at(share, lv) for lv in LEVELS}
    S_all = torch.stack(S_list)
    S_norm = S_all / S_all[:, :1].clamp_min(1e-300)  # each expert's spectrum over its largest value
    k = S_all.shape[1]
    idx = sorted({min(k, max(1, round(x))) for x in torch.linspace(1, k, CURVE_POINTS).tolist()})
    return dict(
        experts=E, m=M, n=N,
        expert_rank={f"{int(lv * 100)}": dict(mean=sum(r) / E, min=min(r), max=max(r)) for lv, r in ranks.items()},
        expert_spectra=dict(index=idx, values=S_norm[:, [j - 1 for j in idx]].tolist(), largest=S_all[:, 0].tolist()),
        mean_spectrum=S_norm.mean(0).tolist(),
        overlap=overlap / pairs if pairs else None, overlap_random=baseline / pairs if pairs else None,
        stacked_energy=curves, d_for_energy=d_at)


def analyze_checkpoint(src, out: Path | None = None, projections=KINDS, layers: str | None = None,
                       device: str = "cpu", overwrite: bool = False) -> dict:
    """The figures of the module notes, per chosen layer and kind; with `out`, analysis.json and the
    plots, written into a temporary directory beside it and renamed at the end."""
    if out is not None:
        check_destination(Path(out), overwrite)
    ckpt = SourceCheckpoint(resolve(src))
    check_not_molae(ckpt, "analyze")
    groups = find_expert_groups(ckpt)
    if not groups:
        raise CheckpointError(f"{ckpt.path} has no MoE expert weights to analyze")
    projections = check_projections(projections)
    by_layer = {g.layer: g for g in groups.values()}
    chosen = parse_layers(layers, sorted(by_layer))
    result = dict(model=str(src), layers={})
    for i in progress_bar(chosen, desc="analyze", unit="layer"):
        result["layers"][str(i)] = {}
        for kind in projections:
            W = by_layer[i].read_kind(ckpt, kind).to(device)
            if kind == "down":
                W = W.transpose(1, 2)
            if not torch.isfinite(W).all():
                raise ValueError(f"layer {i} {kind}: the weights have NaN/Inf values")
            result["layers"][str(i)][kind] = analyze_projection(W)
            del W
    if out is not None:
        tmp = temp_dir_for(Path(out))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with removed_on_error(tmp, resumable=False):
            (tmp / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
            plot_analysis(result, tmp)
            publish(tmp, Path(out), overwrite)
    return result


def without_spectra(result: dict) -> dict:
    """The analysis without its per-expert spectra (most of the file; every other figure kept): what results/
    commits."""
    return dict(result, layers={layer: {kind: {k: v for k, v in r.items() if k != "expert_spectra"}
                                        for kind, r in kinds.items()} for layer, kinds in result["layers"].items()})


def format_analysis(result: dict) -> str:
    lines = ["| layer | kind | E x m x n | expert rank @90/95/99% (mean) | shared d @90/95/99% (G=1) | "
             "row-space overlap (random) |", "|---:|---|---|---|---|---|"]
    for layer, kinds in result["layers"].items():
        for kind, r in kinds.items():
            er = "/".join(f"{r['expert_rank'][k]['mean']:.0f}" for k in ("90", "95", "99"))
            d = "/".join(str(r["d_for_energy"]["1"][k]) for k in ("90", "95", "99"))
            ov = f"{r['overlap']:.3f} ({r['overlap_random']:.3f})" if r["overlap"] is not None else "-"
            lines.append(f"| {layer} | {kind} | {r['experts']} x {r['m']} x {r['n']} | {er} | {d} | {ov} |")
    return "\n".join(lines)


def format_comparison(results: dict[str, dict]) -> str:
    """Several models' analyses side by side, per layer and kind: row-space overlap above random subspaces of
    the same ranks (what a shared latent can use), mean expert rank at 90% energy over m, and the shared d
    (G = 1) that keeps 90% of the stacked energy over n. Models must share their layers and kinds."""
    names = list(results)
    first = results[names[0]]["layers"]
    head = " | ".join(f"{n}: overlap - random, rank90/m, d90/n" for n in names)
    lines = [f"| layer | kind | {head} |", "|---:|---|" + "---|" * len(names)]
    for layer, kinds in first.items():
        for kind in kinds:
            cells = []
            for n in names:
                r = results[n]["layers"][layer][kind]
                over = "-" if r["overlap"] is None else f"{r['overlap'] - r['overlap_random']:+.3f}"
                cells.append(f"{over}, {r['expert_rank']['90']['mean'] / r['m']:.2f}, "
                             f"{r['d_for_energy']['1']['90'] / r['n']:.2f}")
            lines.append(f"| {layer} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def analysis_summary(results: dict[str, dict]) -> str:
    """Models of any shapes side by side, one row per model and kind, each figure the mean over its layers
    (min-max in brackets): row-space overlap above that of random subspaces of the same ranks, mean expert rank
    at 90% energy over m, and the shared d (G = 1) keeping 90% of the stacked energy over n."""
    def cell(vals, fmt):
        return f"{sum(vals) / len(vals):{fmt}} [{min(vals):{fmt}}, {max(vals):{fmt}}]"

    lines = ["| model | kind | layers | overlap - random | rank90 / m | d90 / n (G = 1) |",
             "|---|---|---:|---|---|---|"]
    for name, res in results.items():
        kinds = dict.fromkeys(k for layer in res["layers"].values() for k in layer)
        for kind in kinds:
            rs = [layer[kind] for layer in res["layers"].values() if kind in layer]
            over = [r["overlap"] - r["overlap_random"] for r in rs if r["overlap"] is not None]
            lines.append(f"| {name} | {kind} | {len(rs)} | {cell(over, '+.3f') if over else '-'} | "
                         f"{cell([r['expert_rank']['90']['mean'] / r['m'] for r in rs], '.2f')} | "
                         f"{cell([r['d_for_energy']['1']['90'] / r['n'] for r in rs], '.2f')} |")
    return "\n".join(lines)


def plot_analysis(result: dict, out: Path):
    """energy_vs_d.png (G = 1, one line per layer, a panel per kind), spectra.png (experts' singular
    values), groups.png (G for the middle layer), ranks.png (expert ranks and shared d per layer,
    and overlap against random)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(result["layers"])
    kinds = list(result["layers"][layers[0]])
    cmap = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(int(layers[0]), max(int(layers[-1]), int(layers[0]) + 1))

    def layer_colorbar(fig, axes):
        """Every per-layer line is named by its colour (a legend of dozens of layers would not fit)."""
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="layer (line colour)",
                     pad=0.01)

    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds) + 1, 3.8), squeeze=False,
                             layout="constrained")
    for ax, kind in zip(axes[0], kinds):
        for layer in layers:
            r = result["layers"][layer][kind]
            c = r["stacked_energy"]["1"]
            ax.plot([d / r["n"] for d in c["d"]], c["energy"], color=cmap(norm(int(layer))))
        ax.axvline(r["m"] / r["n"], color="grey", ls=":", lw=1, label="d = m")
        ax.set(title=f"{kind}: energy kept by a shared latent (G=1)", xlabel="d / n",
               ylabel="share of energy kept", ylim=(0, 1.01))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    layer_colorbar(fig, axes[0])
    fig.savefig(out / "energy_vs_d.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds) + 1, 3.8), squeeze=False,
                             layout="constrained")
    for ax, kind in zip(axes[0], kinds):
        for li, layer in enumerate(layers):
            sp = result["layers"][layer][kind]["expert_spectra"]
            vals = torch.tensor(sp["values"])
            color = cmap(norm(int(layer)))
            ax.plot(sp["index"], vals.mean(0), color=color, label="mean over experts" if li == 0 else None)
            ax.fill_between(sp["index"], vals.min(0).values, vals.max(0).values, color=color, alpha=0.12,
                            label="min-max over experts" if li == 0 else None)
        ax.set(title=f"{kind}: experts' singular values", xlabel="index j", ylabel="sigma_j / sigma_1", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    layer_colorbar(fig, axes[0])
    fig.savefig(out / "spectra.png", dpi=110)
    plt.close(fig)

    mid = layers[len(layers) // 2]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        r = result["layers"][mid][kind]
        for G, c in r["stacked_energy"].items():
            ax.plot([d / r["n"] for d in c["d"]], c["energy"], label=f"G={G}")
        ax.set(title=f"layer {mid} {kind}: groups", xlabel="d / n", ylabel="share of energy kept", ylim=(0, 1.01))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "groups.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [int(layer) for layer in layers]
    for ki, (kind, style) in enumerate(zip(kinds, ("o-", "s-", "^-"))):
        n, color = result["layers"][layers[0]][kind]["n"], f"C{ki}"
        axes[0].plot(x, [result["layers"][lay][kind]["d_for_energy"]["1"]["90"] / n for lay in layers], style,
                     color=color, label=f"{kind}: shared d @90% / n")
        axes[0].plot(x, [result["layers"][lay][kind]["expert_rank"]["90"]["mean"] / n for lay in layers], style,
                     color=color, alpha=0.35, label=f"{kind}: one expert's rank @90% / n")
        axes[1].plot(x, [result["layers"][lay][kind]["overlap"] or 0 for lay in layers], style, color=color,
                     label=kind)
        axes[1].plot(x, [result["layers"][lay][kind]["overlap_random"] or 0 for lay in layers], ":", color=color,
                     label=f"{kind}: random subspaces of the same ranks")
    axes[0].set(title="rank needed for 90% energy", xlabel="layer", ylabel="fraction of n")
    axes[1].set(title="row-space overlap between experts (dotted: random)", xlabel="layer", ylabel="overlap")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_xticks(x)
    fig.tight_layout()
    fig.savefig(out / "ranks.png", dpi=110)
    plt.close(fig)


__all__ = ["analyze_checkpoint", "analyze_projection", "format_analysis", "format_comparison", "plot_analysis"]
