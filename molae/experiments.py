"""Reports of GPU training runs: results/reference_models.* and results/pretrain.* from the files
the runs wrote (summary.json, log.jsonl, bigram.json of `scripts/gpu/reference.sh`; the JSON lines
of `scripts/gpu/pretrain.sh`). Every figure is read from those files; nothing is typed in.

    python -m molae.experiments reference --run NAME=DIR[@COMMIT] ... --out results --device "..." --date D
    python -m molae.experiments pretrain FILE.jsonl --out results --commit C --device "..." --date D
    python -m molae.experiments scaling FILE.jsonl --out results --commit C --device "..." --date D
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import write_json_atomically
from .frontier import FRONTIER, batch_runs, frontier_report, run_frontier
from .train import read_log


def curve(log: list[dict]) -> dict:
    """Validation points (step, tokens, val_loss) and the training-loss points of a run's log."""
    return dict(val=[(r["step"], r["tokens"], r["val_loss"]) for r in log if "val_loss" in r],
                train=[(r["step"], r["tokens"], r["loss"]) for r in log if "tokens_per_s" in r])


def load_reference_run(path: Path) -> dict:
    path = Path(path)
    summary = json.loads((path / "summary.json").read_text())
    log = read_log(path / "log.jsonl")
    bigram = json.loads((path / "bigram.json").read_text())
    budget = next((r for r in log if r.get("event") == "time_budget"), None)
    bad = [r for r in log if r.get("event") == "nonfinite_grad"]
    named = lambda p: p["first"] + p["deepest"] if isinstance(p, dict) else p  # noqa: E731  (older logs: a list)
    return dict(summary=summary, bigram=bigram, curve=curve(log), time_budget=budget,
                nonfinite_steps=[r["step"] for r in bad],
                nonfinite_params=sorted({p for r in bad for p in named(r["params"])}),
                nonfinite_origin=next((r for r in log if r.get("event") == "nonfinite_origin"), None))


def _notes(notes: Path | None) -> str:
    return "\n" + Path(notes).read_text() if notes else ""


def reference_report(runs: dict[str, tuple[Path, str]], out: Path, device: str, date: str, command: str,
                     notes: Path | None = None) -> dict:
    """runs: {name: (run directory, git commit)}. Writes reference_models.{json,md,png} under out."""
    rows = {}
    for name, (path, commit) in runs.items():
        r = load_reference_run(path)
        s = r["summary"]
        rows[name] = dict(commit=commit, preset=s["config"]["name"], family=s["config"]["family"],
                          params=s["params"], tokens=s["tokens"], steps=s["config"]["steps"],
                          seconds_per_step=r["time_budget"]["step_seconds"] if r["time_budget"] else None,
                          tokens_per_s=s["tokens_per_s"], mfu=s["mfu"], peak_flops=s["peak_flops"],
                          final_val_loss=s["final_val_loss"], val_bits_per_byte=s["val_bits_per_byte"],
                          val_tokens=s.get("val_tokens"), bigram=r["bigram"], skipped_steps=s.get("skipped_steps", 0),
                          nonfinite_steps=r["nonfinite_steps"], nonfinite_params=r["nonfinite_params"],
                          nonfinite_origin=r["nonfinite_origin"], data=s["data"], seed=s["config"]["seed"],
                          lr=s["config"]["lr"], config=s["config"],
                          curve=r["curve"], device_name=s["device_name"], torch=s["torch"])
    result = dict(device=device, date=date, command=command, models=rows)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "reference_models.json", result)
    (out / "reference_models.md").write_text(reference_markdown(result) + _notes(notes))
    plot_curves({k: v["curve"] for k, v in rows.items()}, out / "reference_models.png",
                "reference models: validation loss on held-out packages",
                floor=("bigram", next(iter(rows.values()))["bigram"]["bigram_loss"]))
    return result


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def reference_markdown(result: dict) -> str:
    rows = result["models"]
    any_row = next(iter(rows.values()))
    lines = [
        "# Reference models ([4])",
        "",
        f"Device: {result['device']}. Date: {result['date']}. Data: the Python source of the GPU image's "
        f"site-packages and standard library (file list sha256 `{any_row['data']['file_list_sha256']}`, tokenizer "
        f"sha256 `{any_row['data']['tokenizer_sha256']}`, both in `results/data/`). Validation: "
        f"{any_row['val_tokens']:,} tokens of held-out packages (the split rule in results/data/manifest.json).",
        "",
        "| model | family | params total / non-emb / active | routed experts | tokens | steps | tokens/s | MFU | "
        "val loss | val bits/byte | bigram val loss | skipped steps | commit |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        p = r["params"]
        lines.append(f"| {name} | {r['family']} | {_m(p['total'])} / {_m(p['non_embedding'])} / {_m(p['active'])} | "
                     f"{_m(p['routed_experts'])} | {r['tokens'] / 1e6:.0f}M | {r['steps']} | {r['tokens_per_s']:,.0f} | "
                     f"{100 * r['mfu']:.1f}% | {r['final_val_loss']:.4f} | {r['val_bits_per_byte']:.4f} | "
                     f"{r['bigram']['bigram_loss']:.4f} | {r['skipped_steps']} | `{r['commit']}` |")
    lines += ["", "Commands (one GPU call each; `--time-budget` fixed the step count from the measured step time, "
              "recorded in each run's train_config.json, so `--steps N` with the same preset and seed repeats its configuration and data order):",
              "", "```bash", result["command"], "```", "",
              "Loss curves: reference_models.png. MFU is against the bf16 matmul peak measured in the same process "
              "(8192^3 GEMMs), FLOPs counted as 3x the forward's matmul FLOPs plus 12 x layers x heads x head_dim x "
              "sequence for attention. Active parameters count the embedding, all dense weights and the top-k experts."]
    for name, r in rows.items():
        if r["nonfinite_steps"]:
            lines += ["", f"{name}: {len(r['nonfinite_steps'])} steps had non-finite gradients and were skipped (steps "
                      f"{', '.join(map(str, r['nonfinite_steps'][:20]))}); parameters with a non-finite gradient "
                      f"included {', '.join(r['nonfinite_params'][:4])}, ... (a NaN that arises in the backward "
                      "reaches every parameter below it, so these say little about where)."]
            o = r.get("nonfinite_origin")
            if o and o.get("reproduced"):
                lines[-1] += (f" Re-run of the first such step, eagerly with hooks: loss finite {o['loss_finite']}, "
                              f"first non-finite forward output {o['forward_first_nonfinite']}; in the backward the "
                              f"output gradient of `{o['backward_last_finite_before']}` was finite and that of "
                              f"`{o['backward_first_nonfinite']}` the first non-finite one (it arose between them); "
                              f"{o['params']['count']} of {o['params']['of']} parameters, the deepest "
                              f"`{o['params']['deepest'][-1]}`.")
            elif o:
                lines[-1] += f" A re-run of the first such step did not reproduce it ({o.get('error', 'all finite')})."
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, dict], path: Path, title: str, floor: tuple[str, float] | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name, c in curves.items():
        ax.plot([t / 1e6 for _, t, _ in c["val"]], [v for *_, v in c["val"]], "o-", ms=3, label=name)
    if floor:
        ax.axhline(floor[1], color="gray", ls="--", label=f"{floor[0]} ({floor[1]:.2f})")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    top = max([v for c in curves.values() for *_, v in c["val"]] + ([floor[1]] if floor else []))
    ax.set_ylim(top=min(8, top + 0.2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- pretraining comparison

DESCRIPTIONS = {
    "moe": "standard MoE (the base)",
    "molae-g1-upgate": "MoLAE, G=1, up+gate factorized, d=n/2",
    "molae-g1-all": "MoLAE, G=1, up+gate+down factorized, d=n/2",
    "molae-g4-upgate": "MoLAE, G=4, up+gate factorized, d=n/2",
    "latentmoe": "LatentMoE, l=n/2, 2x experts, 2x top-k",
    "moe-small": "standard MoE, m shrunk to MoLAE-all's parameters",
}


def pretrain_report(jsonl: Path, out: Path, commit: str, device: str, date: str, command: str,
                    notes: Path | None = None) -> dict:
    runs = read_log(jsonl)
    base = next(r for r in runs if r["variant"] == "moe")
    rows = []
    for r in runs:
        rows.append(dict(variant=r["variant"], description=DESCRIPTIONS.get(r["variant"], ""), molae=r["config"]["molae"],
                         model=r["config"]["model"], params=r["params"], train_flops=r["train_flops"],
                         tokens=r["tokens"], tokens_per_s=r["tokens_per_s"], mfu=r["mfu"],
                         final_val_loss=r["final_val_loss"], val_bits_per_byte=r["val_bits_per_byte"],
                         skipped_steps=r.get("skipped_steps", 0), curve=curve(r["log"]),
                         non_embedding_vs_moe=r["params"]["non_embedding"] / base["params"]["non_embedding"],
                         tokens_per_s_vs_moe=r["tokens_per_s"] / base["tokens_per_s"]))
    result = dict(commit=commit, device=device, date=date, command=command, steps=base["config"]["steps"],
                  tokens=base["tokens"], base_config=base["config"], data=base["data"], rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "pretrain_same_tokens.json", result)
    (out / "pretrain_same_tokens.md").write_text(pretrain_markdown(result) + _notes(notes))
    plot_pretrain(rows, out / "pretrain_same_tokens.png")
    return result


def pretrain_markdown(result: dict) -> str:
    base = next(r for r in result["rows"] if r["variant"] == "moe")
    lines = [
        "# Pretraining comparison ([4]): MoE vs MoLAE vs LatentMoE from scratch, same tokens",
        "",
        f"Commit `{result['commit']}`, {result['device']}, {result['date']}. Every variant: the `pretrain-moe` preset "
        f"(Qwen2-MoE layout, n = m = 512, 6 layers, 16 experts, top-2, no shared expert, vocabulary 16384), "
        f"{result['steps']} steps of 64 x 512 tokens = {result['tokens'] / 1e6:.1f}M tokens, seed "
        f"{result['base_config']['seed']}, the same batches in the same order. Validation: held-out packages of "
        f"the code corpus (file list sha256 `{result['data']['file_list_sha256'][:16]}...`).",
        "",
        "| variant | params total / non-emb / active | non-emb vs MoE | train FLOPs | val loss | val bits/byte | "
        "tokens/s | vs MoE |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        p = r["params"]
        lines.append(f"| {r['variant']}: {r['description']} | {_m(p['total'])} / {_m(p['non_embedding'])} / "
                     f"{_m(p['active'])} | {100 * r['non_embedding_vs_moe']:.0f}% | {r['train_flops']:.3g} | "
                     f"{r['final_val_loss']:.4f} | {r['val_bits_per_byte']:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s_vs_moe']:.2f}x |")
    lines += ["", "Command:", "", "```bash", result["command"], "```", "",
              "Plot: pretrain_same_tokens.png (validation loss against total, non-embedding and active parameters and "
              f"against training FLOPs; validation curves). Base MoE validation loss {base['final_val_loss']:.4f}."]
    return "\n".join(lines) + "\n"


def plot_pretrain(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    xs = [("total parameters (M)", lambda r: r["params"]["total"] / 1e6),
          ("non-embedding parameters (M)", lambda r: r["params"]["non_embedding"] / 1e6),
          ("active parameters (M)", lambda r: r["params"]["active"] / 1e6),
          ("training FLOPs (PFLOP)", lambda r: r["train_flops"] / 1e15)]
    for ax, (label, fx) in zip(axes, xs):
        for r in rows:
            ax.plot([fx(r)], [r["final_val_loss"]], "o", ms=7, label=r["variant"])
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[4]
    for r in rows:
        ax.plot([t / 1e6 for _, t, _ in r["curve"]["val"]], [v for *_, v in r["curve"]["val"]], "o-", ms=3,
                label=r["variant"])
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    fig.suptitle("MoE vs MoLAE vs LatentMoE trained from scratch on the same tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- FSDP2 scaling


def scaling_report(jsonl: Path, out: Path, commit: str, device: str, date: str, command: str) -> dict:
    """Weak scaling from scripts/gpu/scaling.sh: the same per-process batch on 1 and K processes."""
    runs = sorted(read_log(jsonl), key=lambda r: r["world"])
    one = runs[0]
    if one["world"] != 1:
        raise ValueError(f"{jsonl} has no single-process run to scale against")
    rows = [dict(world=r["world"], tokens_per_s=r["tokens_per_s"], mfu=r["mfu"], tokens=r["tokens"],
                 final_val_loss=r["final_val_loss"],
                 efficiency=r["tokens_per_s"] / (r["world"] * one["tokens_per_s"])) for r in runs]
    result = dict(commit=commit, device=device, date=date, command=command, preset=one["config"]["name"], rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "scaling.json", result)
    lines = ["# FSDP2 scaling ([4])", "",
             f"Commit `{commit}`, {device}, {date}. Preset `{result['preset']}`, the same per-GPU batch on every "
             "run (weak scaling); efficiency = tokens/s / (GPUs x tokens/s on one GPU).", "",
             "| GPUs | tokens/s | MFU | scaling efficiency |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['world']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {100 * r['efficiency']:.0f}% |"
              for r in rows]
    lines += ["", "Command:", "", "```bash", command, "```"]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    return result


def frontier_batches(a) -> list[dict]:
    """`experiments frontier`'s provenance: --batches FILE (each batch's runs read from its log), or one batch."""
    if a.batches:
        batches = json.loads(a.batches.read_text())
        for b in batches:
            if "log" in b:
                b["runs"] = batch_runs((a.batches.parent / b.pop("log")).read_text())
        return batches
    missing = [f"--{k.replace('_', '-')}" for k in ("commit", "gpu_command", "device", "date") if not getattr(a, k)]
    if missing:
        raise ValueError(f"frontier: {', '.join(missing)} missing: give --batches FILE, or --commit, --gpu-command, "
                         "--device and --date for one batch")
    return [dict(commit=a.commit, device=a.device, date=a.date, command=a.gpu_command)]


def main(argv=None) -> int:
    from .cli import Parser, run_command

    p = Parser(prog="python -m molae.experiments", description="write results/ reports from GPU training runs")
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="results/reference_models.{json,md,png}")
    ref.add_argument("--run", action="append", required=True, metavar="NAME=DIR@COMMIT",
                     help="a run directory (summary.json, log.jsonl, bigram.json) and the commit that produced it")
    ref.add_argument("--gpu-command", required=True, help="the GPU command(s) that produced the runs")
    pre = sub.add_parser("pretrain", help="[4]'s same-tokens comparison: results/pretrain_same_tokens.{json,md,png}")
    pre.add_argument("jsonl", type=Path, help="the pretrain.jsonl that scripts/gpu/pretrain.sh wrote")
    pre.add_argument("--commit", required=True)
    pre.add_argument("--gpu-command", required=True)
    sc = sub.add_parser("scaling", help="results/scaling.{json,md}")
    sc.add_argument("jsonl", type=Path, help="the scaling.jsonl that scripts/gpu/scaling.sh wrote")
    sc.add_argument("--commit", required=True)
    sc.add_argument("--gpu-command", required=True)
    fr = sub.add_parser("frontier-run", help="[11] train a shape's frontier variants (molae/frontier.py), resumable")
    fr.add_argument("shape", choices=list(FRONTIER), help="which shape's plan")
    fr.add_argument("--data", type=Path, required=True, help="a molae data prepare directory")
    fr.add_argument("--runs", type=Path, required=True, help="runs go to RUNS/SHAPE/VARIANT")
    fr.add_argument("--steps", type=int, default=None, help="steps for every variant (default: the preset's)")
    fr.add_argument("--only", default=None, help="comma-separated variants (default all, in plan order)")
    fr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a TrainConfig override for every variant, e.g. compile_mode=reduce-overhead (repeatable)")
    fr.add_argument("--no-progress", action="store_true")
    fx = sub.add_parser("frontier", help="[11] results/pretrain_frontier.{json,md,png} from finished frontier runs")
    fx.add_argument("--runs", type=Path, required=True, help="the RUNS directory of frontier-run")
    fx.add_argument("--shape", action="append", choices=list(FRONTIER), default=None, help="default: both")
    fx.add_argument("--batches", type=Path, default=None,
                    help="a JSON list of the GPU batches that trained the runs, each {commit, device, date, command, "
                         "log} (log: frontier.sh's log beside the file, naming the runs it trained); or one batch "
                         "as --commit, --gpu-command, --device and --date")
    fx.add_argument("--commit")
    fx.add_argument("--gpu-command")
    fx.add_argument("--manifest", type=Path, default=None,
                    help="the data's manifest.json: adds each run's passes over the training split and first-pass loss")
    fx.add_argument("--conclusion", type=Path, default=None,
                    help="a markdown reading: also writes OUT/pretrain.md, the generated verdict table and the reading")
    for q in (ref, pre, sc, fx):
        q.add_argument("--out", type=Path, default=Path("results"))
        q.add_argument("--device", required=q is not fx)
        q.add_argument("--date", required=q is not fx)
        q.add_argument("--notes", type=Path, default=None, help="a markdown file appended to the report (reading, caveats)")
    args = p.parse_args(argv)

    def go(a):
        if a.command == "reference":
            runs = {}
            for spec in a.run:
                name, _, rest = spec.partition("=")
                path, _, commit = rest.partition("@")
                runs[name] = (Path(path), commit or "unknown")
            reference_report(runs, a.out, a.device, a.date, a.gpu_command, a.notes)
        elif a.command == "pretrain":
            pretrain_report(a.jsonl, a.out, a.commit, a.device, a.date, a.gpu_command, a.notes)
        elif a.command == "frontier-run":
            only = a.only.split(",") if a.only else None
            done = run_frontier(a.shape, a.data, a.runs, a.steps, only, progress=not a.no_progress, overrides=a.set)
            print(f"{a.shape}: {len(done)} runs finished under {a.runs}")
            return
        elif a.command == "frontier":
            frontier_report(a.runs, a.shape or list(FRONTIER), a.out, frontier_batches(a),
                            a.notes.read_text() if a.notes else "", a.manifest,
                            a.conclusion.read_text() if a.conclusion else None)
        else:
            scaling_report(a.jsonl, a.out, a.commit, a.device, a.date, a.gpu_command)
        print(f"wrote {a.command} report under {a.out}")

    args.command_name = "molae experiments"
    return run_command(args, go)


if __name__ == "__main__":
    sys.exit(main())
