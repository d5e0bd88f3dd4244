"""`molae bench quality`: conversion quality of MoLAE against the peer methods, side by side.

One model per run. Every method goes through `convert_checkpoint` (what `molae convert` runs) into
a fresh directory, is loaded back with transformers and scored on the same held-out windows:

    original
    per budget f (a fraction of the routed-expert parameters kept):
      molae-free rr=R     the paper's data-free two-step conversion, uniform d, rank_ratio R
      molae-aware         activation-aware factorization, uniform d
      molae-alloc         activation-aware + d per layer and projection from --budget
      molae-alloc+heal    the same, then `molae heal` (its latent factors, KL to the original)
      every other method of the registry (molae/methods): svd, d2moe, mobe, hcsmoe, prune-frequency, prune-reap
      METHOD+heal         each of them, then the same `molae heal` (what it stores: SVD's factors, the kept or
                          merged experts; D2-MoE's and MoBE's whole written weights, more than they store)
      molae-alloc-g(+heal) molae-alloc with G per layer chosen by the budget too (--group-choices 1,2,4,..,E)
      molae-alloc(-g)-sqrt, molae-alloc-g-sim, molae-alloc-g-div   candidates measured against those two
                          (--error-power 0.5; groups by similarity; every divisor of E as a choice)

All MoLAE variants factorize gate, up and down with G = 1 (the budgets go below the third that a
whole down projection would take). Every calibrated method gets the same calibration windows
(--calib-tokens of the training split, --calib-seed picks which), run through the layer-by-layer pipeline.
Scored on --eval-tokens of held-out windows: perplexity with a 95% bootstrap interval over the windows, and
exact-match next-line completion (evaluate.line_exact_match); the windows' NLLs are kept, so the report gives
paired intervals for best MoLAE against the best baseline. Results are appended to --json after each run;
--resume skips the variants already there. `molae bench quality-report FILES --out results` renders
quality.md (one table per model) and quality.png (validation perplexity against parameters).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from ..checkpoint import SourceCheckpoint, resolve, write_json_atomically
from ..convert import ConvertOptions, convert_checkpoint, find_expert_groups
from ..evaluate import load
from ..layers import KINDS
from ..evaluate import (line_exact_match, newline_tokens, paired_change, perplexity_interval, ratio_interval, verdict,
                        window_bytes, window_scores)

from ..budget import uniform_latent
from ..methods import METHODS
from ..command import (add_command, comma_list, existing_path, float_list, fraction_list, named_file,
                       positive_float, positive_int, progress_bar)

BASELINES = tuple(name for name in METHODS if name != "molae")
# "+heal": the same whole-model healing budget (`molae heal`) for every method ([10] part 5): MoLAE's and SVD's
# latent factors; the whole experts of the methods that write them (heal.py: merged experts trained tied; D2-MoE's
# and MoBE's multiplied-out weights are more parameters than they store, an upper bound for them)
HEALED = {"molae-alloc+heal": "molae-alloc", "molae-alloc-g+heal": "molae-alloc-g",
          "molae-alloc-sqrt+heal": "molae-alloc-sqrt", **{f"{b}+heal": b for b in BASELINES}}
VARIANTS = ("molae-free", "molae-aware", "molae-alloc", "molae-alloc+heal", *BASELINES,
            *(f"{b}+heal" for b in BASELINES), "molae-alloc-g", "molae-alloc-g+heal", "molae-alloc-sqrt",
            "molae-alloc-sqrt+heal", "molae-alloc-g-sqrt", "molae-alloc-g-sim", "molae-alloc-g-div")  # --methods
# -sqrt: the budget allocation weighs each error by the square root of its energy (--error-power 0.5), not by the
# energy (relative error): better on one CPU reference, slightly worse on the other (results/error_power/)
GROUP_CHOICES = (1, 2, 4, 8, 16, "E")  # the G's molae-alloc-g's budget chooses among (the divisors of E of them)
# Candidates for G per layer, measured against molae-alloc-g: -sim groups the experts by similarity (--group-by
# similarity) rather than by index; -div chooses among every divisor of E (24 experts: also G = 3, 6, 12)
G_VARIANTS = {"molae-alloc-g-sqrt": dict(group_choices=GROUP_CHOICES, error_power=0.5),
              "molae-alloc-g-sim": dict(group_choices=GROUP_CHOICES, group_by="similarity"),
              "molae-alloc-g-div": dict(group_choices="divisors")}


def g_choices(choices, E: int) -> tuple | None:
    """A variant's G choices for a layer of E experts: those of `choices` that divide E ("E": one latent per
    expert), or every divisor of E for "divisors"."""
    if choices is None:
        return None
    choices = (*range(1, E), "E") if choices == "divisors" else choices
    return tuple(c for c in choices if c == "E" or (c < E and E % c == 0))


def score(path, windows_WT: torch.Tensor, n_bytes: int, device, newline_V: torch.Tensor | None = None,
          batch_size: int = 16) -> dict:
    """Of the model at `path` (float32) on held-out windows: loss (nats/token), perplexity with its 95% interval
    over the windows, bits per byte, each window's mean NLL (what the report's paired intervals resample); with
    `newline_V`, exact-match next-line completion (evaluate.line_exact_match) with its interval."""
    model = load(str(path), str(device), "float32", need_tokenizer=False)[0]
    nll_W, hit_WT = window_scores(model, windows_WT, batch_size, device, hits=newline_V is not None)
    nll_W = nll_W.cpu()
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    count = windows_WT[:, 1:].numel()
    nll = float(nll_W.sum())
    per_window = nll_W / (windows_WT.shape[1] - 1)  # each window scores all but its first token
    out = dict(loss=nll / count, perplexity=math.exp(nll / count), perplexity_95=perplexity_interval(per_window),
               bits_per_byte=nll / math.log(2) / n_bytes, tokens=count,
               window_nll=[round(float(x), 6) for x in per_window])
    if newline_V is not None:
        matched, lines = line_exact_match(windows_WT, hit_WT, newline_V)
        out.update(next_line=float(matched.sum() / lines.sum().clamp_min(1)),
                   next_line_95=ratio_interval(matched, lines), lines=int(lines.sum()),
                   window_lines=lines.tolist(), window_matched=matched.tolist())
    return out


def variants(budgets, rank_ratios, methods) -> list[tuple[str, float, dict]]:
    """(name, budget, ConvertOptions fields or {"heal": base variant}) in run order."""
    out = []
    for f in budgets:
        for r in rank_ratios:
            if "molae-free" in methods:
                out.append((f"molae-free rr={r:g}", f, dict(rank_ratio=None if r >= 1 else r, uniform=True)))
        if "molae-aware" in methods:
            out.append(("molae-aware", f, dict(calibrated=True, uniform=True)))
        if "molae-alloc" in methods:
            out.append(("molae-alloc", f, dict(calibrated=True, budget=f)))
            if "molae-alloc+heal" in methods:
                out.append(("molae-alloc+heal", f, dict(heal="molae-alloc")))
        for b in BASELINES:
            if b in methods:
                out.append((b, f, dict(method=b, budget=f, calibrated=METHODS[b].calibration != "none")))
        out += [(f"{b}+heal", f, dict(heal=b, method=b)) for b in BASELINES if b in methods and f"{b}+heal" in methods]
        if "molae-alloc-g" in methods:  # G per layer chosen by the budget too, from 1 up to one latent per expert
            out.append(("molae-alloc-g", f, dict(calibrated=True, budget=f, group_choices=GROUP_CHOICES)))
            if "molae-alloc-g+heal" in methods:
                out.append(("molae-alloc-g+heal", f, dict(heal="molae-alloc-g")))
        if "molae-alloc-sqrt" in methods:
            out.append(("molae-alloc-sqrt", f, dict(calibrated=True, budget=f, error_power=0.5)))
            if "molae-alloc-sqrt+heal" in methods:
                out.append(("molae-alloc-sqrt+heal", f, dict(heal="molae-alloc-sqrt")))
        out += [(name, f, dict(calibrated=True, budget=f, **extra)) for name, extra in G_VARIANTS.items()
                if name in methods]
    return out


def bench_quality(args):
    """Run every variant on one model; results appended to args.json as they finish."""
    from ..data import TokenData
    from ..heal import heal

    device = torch.device(args.device)
    src = Path(resolve(args.model))
    data = TokenData(args.data)
    windows = data.val_windows(args.seq_len, args.eval_tokens)
    n_bytes = window_bytes(data.tokenizer(), windows)
    newline_V = newline_tokens(data.tokenizer(), data.vocab_size)
    ckpt = SourceCheckpoint(src)
    g = next(iter(find_expert_groups(ckpt).values()))
    E, m, n = g.n_experts, g.inter, g.dim
    out_json = Path(args.json)
    result = json.loads(out_json.read_text()) if args.resume and out_json.exists() else dict(
        name=args.name, model=str(args.model), shapes=dict(experts=E, inter=m, dim=n, top_k=ckpt.config.get(
            "num_experts_per_tok")), device=args.device_name, date=args.date, commit=args.commit,
        command=args.command, settings=dict(calib_tokens=args.calib_tokens, calib_seed=args.calib_seed,
                                            heal_tokens=args.heal_tokens,
                                            eval_tokens=len(windows) * args.seq_len, seq_len=args.seq_len,
                                            eval_bytes=n_bytes, mobe_steps=args.mobe_steps), runs=[])
    done = {(r["variant"], r["budget"]) for r in result["runs"]}
    save = lambda: write_json_atomically(out_json, result)  # noqa: E731
    if "original" not in result:
        t0 = time.perf_counter()
        result["original"] = dict(score(src, windows, n_bytes, device, newline_V), seconds=time.perf_counter() - t0,
                                  params=_params(ckpt))
        save()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    methods = set(args.methods)
    todo = [v for v in variants(args.budgets, args.rank_ratios, methods) if (v[0], v[1]) not in done]
    for name, f, spec in progress_bar(todo, desc=f"quality {args.name}", unit="run"):
        dst = work / f"{name.replace(' ', '_')}-{f:g}"
        t0 = time.perf_counter()
        if "heal" in spec:
            base = work / f"{spec['heal']}-{f:g}"
            was = next((r for r in result["runs"] if (r["variant"], r["budget"]) == (spec["heal"], f)), {})
            if "unreachable" in was:  # nothing to heal: say why, as for the conversion
                result["runs"].append(dict(variant=name, budget=f, method=spec.get("method"),
                                           unreachable=was["unreachable"]))
                save()
                continue
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(base, dst)
            info = heal(dst, src, args.data, args.heal_tokens, args.seq_len, args.heal_batch_size, args.heal_lr,
                        device=args.device, progress=False)
            summary = json.loads((base / "convert_summary.json").read_text())
            extra = dict(heal={k: info[k] for k in ("trained", "trained_params", "stored_params", "steps", "tokens",
                                                    "kl_first", "kl_last", "held_out_kl_before", "held_out_kl_after",
                                                    "applied", "seconds")})
        else:
            opts = ConvertOptions(projections=KINDS, device=args.device, method=spec.get("method", "molae"),
                                  budget=spec.get("budget"), rank_ratio=spec.get("rank_ratio"),
                                  group_choices=g_choices(spec.get("group_choices"), E),
                                  group_by=spec.get("group_by", "index"),
                                  mobe_steps=args.mobe_steps, error_power=spec.get("error_power", 1.0),
                                  latent_dim=uniform_latent(f, E, m, n) if spec.get("uniform") else None,
                                  **(dict(calibration=str(args.data), calib_tokens=args.calib_tokens,
                                          calib_seq_len=args.seq_len, calib_seed=args.calib_seed)
                                     if spec.get("calibrated") else {}))
            try:
                summary = convert_checkpoint(src, dst, opts, overwrite=True)
            except ValueError as e:  # a published form that cannot reach this budget (MoBE's floor): say so
                if "mobe-lowrank" not in str(e):
                    raise
                result["runs"].append(dict(variant=name, budget=f, method=spec.get("method"), unreachable=str(e)))
                save()
                continue
            write_json_atomically(dst / "convert_summary.json", summary)
            extra = dict(latent=sorted({(r["kind"], r["latent_dim"]) for r in summary["layers"]
                                        if r.get("latent_dim")}), rank_ratio=spec.get("rank_ratio"),
                         # per layer and kind: what the budget chose and the error it left (the workdir is lost
                         # with a GPU machine; this is what explains a cell afterwards)
                         layers=[[r["layer"], r["kind"], r.get("groups"), r.get("latent_dim"),
                                  r.get("rel_output_error")] for r in summary["layers"] if "kind" in r])
        run = dict(variant=name, budget=f, method=spec.get("method", "molae"), **extra,
                   params=dict(routed_before=summary["before"]["expert"], routed=summary["after"]["expert_stored"],
                               total=summary["before"]["total"] - summary["before"]["expert"]
                               + summary["after"]["expert_stored"]),
                   convert_seconds=time.perf_counter() - t0)
        run.update(score(dst, windows, n_bytes, device, newline_V))
        result["runs"].append(run)
        save()
        if name not in {HEALED[h] for h in methods if h in HEALED}:  # else kept for its healed copy
            shutil.rmtree(dst, ignore_errors=True)
    return result


def _params(ckpt: SourceCheckpoint) -> dict:
    groups = find_expert_groups(ckpt)
    routed = sum(ckpt.numel(k) for g in groups.values() for k in g.keys)
    return dict(routed_before=routed, routed=routed, total=sum(ckpt.numel(k) for k in ckpt.keys()))


# ----------------------------------------------------------------------------- report


def _merged(results: list[dict]) -> list[dict]:
    """Files of one model, calibration sample and evaluation (a later job's other budgets) as one result, named
    as the first; a (variant, budget) the first already has is not taken again. Other samples stay apart."""
    def sample(r):
        return r["model"], r["settings"]["calib_seed"], r["settings"]["eval_tokens"], r["original"]["perplexity"]

    out = []
    for r in results:
        same = next((o for o in out if sample(o) == sample(r)), None)
        if same is None:
            out.append(dict(r, runs=list(r["runs"])))
            continue
        have = {(x["variant"], x["budget"]) for x in same["runs"]}
        same["runs"] += [x for x in r["runs"] if (x["variant"], x["budget"]) not in have]
    return out


def _best(runs, prefix):  # a failed (non-finite) run is never the best of anything
    return min((r for r in runs if r["variant"].startswith(prefix) and math.isfinite(r["perplexity"])),
               key=lambda r: r["perplexity"], default=None)


def _best_baseline(runs):
    return min((x for x in runs if x["method"] in BASELINES and math.isfinite(x["perplexity"])),
               key=lambda x: x["perplexity"], default=None)


def _paired(new: dict, ref: dict, digits: int = 2) -> tuple[str, str]:
    """("change% [lo, hi]", verdict) of run `new` against run `ref`, paired over their windows' NLLs."""
    c, lo, hi = paired_change(new["window_nll"], ref["window_nll"])
    f = f"+.{digits}f"
    return f"{100 * c:{f}}% [{100 * lo:{f}}, {100 * hi:{f}}]", verdict((lo, hi))


def report(files, out: Path, commit: str | None = None, note: str = "", trend: bool = False,
           analyses: dict[str, Path] | None = None):
    """quality.json (all runs), quality.md (a table per model) and quality.png from bench JSON files.
    commit: the commit of the code the runs used, where the files' own record is wrong (said in the md).
    trend: the files are points along one model's training, in order: add the table of margins along it.
    analyses: {name: `molae analyze` analysis.json}: a section comparing the models' expert redundancy."""
    results = _merged([json.loads(Path(f).read_text()) for f in files])
    for r in results:  # runs a published form could not make (MoBE below its floor) are said, not tabled
        r["unreachable"] = [x for x in r["runs"] if "unreachable" in x]
        r["runs"] = [x for x in r["runs"] if "unreachable" not in x]
    if commit:
        for r in results:
            r["commit_recorded_on_device"], r["commit"] = r["commit"], commit
    out.mkdir(parents=True, exist_ok=True)
    per_window = ("window_nll", "window_lines", "window_matched")  # the run files keep them
    slim = lambda x: {k: v for k, v in x.items() if k not in per_window}  # noqa: E731
    write_json_atomically(out / "quality.json", [dict(r, original=slim(r["original"]),
                                                      runs=[slim(x) for x in r["runs"]]) for r in results])
    lines = ["# Conversion quality: MoLAE against peer MoE compressors ([5])", "",
             "Written by `molae bench quality-report` from the JSON files of `molae bench quality` runs. Budget: "
             "the fraction of routed-expert parameters kept (what each method stores; whole-matrix baselines "
             "written multiplied out are counted by their factors). Perplexity and bits per byte on held-out "
             "code (validation split of the prepared corpus), float32.", *(["", note, ""] if note else [""])]
    for r in results:
        o = r["original"]
        s = r["settings"]
        lines += [f"## {r['name']}", "",
                  f"- model: `{r['model']}` ({r['shapes']['experts']} experts of {r['shapes']['inter']} x "
                  f"{r['shapes']['dim']}, top-{r['shapes']['top_k']}); device {r['device']}; date {r['date']}; "
                  f"commit `{r['commit']}`",
                  f"- command: `{r['command']}`",
                  f"- calibration {s['calib_tokens']:,} tokens; healing {s['heal_tokens']:,} tokens; evaluation "
                  f"{s['eval_tokens']:,} tokens ({s['eval_bytes']:,} bytes)",
                  *([f"- trained in the same GPU call: preset `{r['train_preset']}`, {r['trained']['tokens']:,} tokens, "
                     f"final validation loss {r['trained']['final_val_loss']:.4f} (1024-token windows), "
                     f"{r['trained']['skipped_steps']} steps skipped for non-finite gradients"] if "trained" in r else []),
                  f"- original: perplexity {o['perplexity']:.4f}, {o['bits_per_byte']:.4f} bits/byte, "
                  f"{o['params']['routed']:,} routed-expert parameters", ""]
        budgets = sorted({x["budget"] for x in r["runs"]}, reverse=True)
        names = list(dict.fromkeys(x["variant"] for x in r["runs"]))
        metrics = [("perplexity", ".3f", "validation perplexity"), ("bits_per_byte", ".4f", "bits per byte")]
        if "next_line" in o:
            metrics.append(("next_line", ".4f", f"exact-match next-line completion, share of {o['lines']:,} held-out "
                                                "lines of 4+ tokens that greedy decoding writes exactly (original "
                                                f"{o['next_line']:.4f})"))
        for metric, fmt, what in metrics:
            lines += ["| method | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |",
                      "|---|" + "---:|" * len(budgets)]
            for name in names:
                cells = []
                for b in budgets:
                    x = next((x for x in r["runs"] if x["variant"] == name and x["budget"] == b
                              and metric in x), None)
                    kept = None if x is None else 100 * x["params"]["routed"] / x["params"]["routed_before"]
                    ci = x.get(f"{metric}_95") if x is not None else None
                    ci = f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else ""
                    cells.append("" if x is None else f"{x[metric]:{fmt}}{ci} ({kept:.0f}%)")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines += ["", f"Cells: {what} [95% interval, bootstrap over the held-out windows, where recorded] "
                      "(routed-expert parameters kept).", ""]
        lines += _verdict(r, budgets) + _healing(r)
        lines += [f"- not run: {x['variant']} at {100 * x['budget']:g}%: {x['unreachable']}" for x in r["unreachable"]]
        failed = [x for x in r["runs"] if not math.isfinite(x["perplexity"])]
        lines += [f"- failed: {x['variant']} at {100 * x['budget']:g}%: non-finite held-out loss (left out of "
                  "every comparison)" for x in failed]
        lines += [""] if r["unreachable"] or failed else []
    firsts = [r for i, r in enumerate(results) if r["model"] not in {x["model"] for x in results[:i]}]  # a column each
    lines += _across_models(firsts) + _seeds(results) + (_trend(results) if trend else [])
    lines += _redundancy(analyses) if analyses else []
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    _plot(results, out / "quality.png")


def _redundancy(analyses: dict[str, Path]) -> list[str]:
    from ..analyze import analysis_summary

    results = {name: json.loads(Path(f).read_text()) for name, f in analyses.items()}
    return ["## Expert redundancy of the models (`molae analyze`)", "",
            "Per model and kind, the mean over layers [min, max] of: the experts' row-space overlap above that of "
            "random subspaces of the same ranks (what a shared latent can use), the mean expert rank keeping 90% "
            "of its energy over m, and the shared latent d (G = 1) keeping 90% of the stacked energy over n.", "",
            analysis_summary(results), ""]


def _verdict(r, budgets) -> list[str]:
    """Per budget: the best MoLAE variant against the best baseline, and the gap to the original; where the
    runs recorded their windows' NLLs, the paired 95% interval of best MoLAE / best baseline - 1 and the
    verdict it allows (better / tied / worse). Then the same with every healed run left out, as a second
    table where it differs from the first (a healed run was best somewhere): a job that healed MoLAE but not
    every peer would otherwise set healed MoLAE against them unhealed."""
    paired = "window_nll" in r["original"]
    head = ["| budget | best MoLAE | best baseline | MoLAE at or below every baseline | best MoLAE vs original |"
            + (" best MoLAE vs best baseline (paired 95%) | verdict |" if paired else ""),
            "|---:|---|---|---|---:|" + ("---:|---|" if paired else "")]
    every, plain = ([row for b in budgets if (row := _verdict_row(r, b, unhealed))] for unhealed in (False, True))
    return [*head, *every, ""] + ([] if plain == every else
                                  ["Unhealed against unhealed (every healed run left out of both sides):", "",
                                   *head, *plain, ""])


def _verdict_row(r, b, unhealed: bool) -> str | None:
    o = r["original"]
    runs = [x for x in r["runs"] if x["budget"] == b and not (unhealed and x["variant"] in HEALED)]
    mol, base = _best(runs, "molae"), _best_baseline(runs)
    if mol is None or base is None:
        return None
    row = (f"| {100 * b:g}% | {mol['variant']} {mol['perplexity']:.3f} | {base['variant']} "
           f"{base['perplexity']:.3f} | {'yes' if mol['perplexity'] <= base['perplexity'] else 'no'} | "
           f"{100 * (mol['perplexity'] / o['perplexity'] - 1):+.2f}% |")
    if "window_nll" in o and "window_nll" in mol and "window_nll" in base:
        row += " {} | {} |".format(*_paired(mol, base))
    return row


def _healing(r) -> list[str]:
    """Each healed variant against the same conversion unhealed, paired over the same windows: what the
    healing budget bought each method (the same budget for every method that leaves parameters to train), and
    how many parameters it trained for each it stores (above 1: D2-MoE's and MoBE's written weights)."""
    rows = []
    for x in r["runs"]:
        y = next((y for y in r["runs"] if y["variant"] == HEALED.get(x["variant"]) and y["budget"] == x["budget"]),
                 None)
        if y is not None and "window_nll" in x and "window_nll" in y:
            h = x.get("heal", {})
            ratio = f"{h['trained_params'] / h['stored_params']:.2f}" if h.get("stored_params") else ""
            rows.append(f"| {x['variant']} | {100 * x['budget']:g}% | " + " | ".join(_paired(x, y)) + f" | {ratio} |")
    return ["| healed | budget | healed vs unhealed (paired 95%) | verdict | trained / stored parameters |",
            "|---|---:|---:|---|---:|", *rows, ""] if rows else []


def _across_models(results) -> list[str]:
    """Perplexity change against each model's original, per budget: the paper's data-free conversion
    and the best MoLAE variant, side by side across models (which shapes lose least)."""
    budgets = sorted({x["budget"] for r in results for x in r["runs"]}, reverse=True)
    lines = ["## Across models: perplexity change against the original", "",
             "| budget | " + " | ".join(f"{r['name']} data-free / best MoLAE" for r in results) + " |",
             "|---:|" + "---:|" * len(results)]
    for b in budgets:
        cells = []
        for r in results:
            o = r["original"]["perplexity"]
            runs = [x for x in r["runs"] if x["budget"] == b]
            free = next((x for x in runs if x["variant"] == "molae-free rr=1"), None)
            best = _best(runs, "molae")
            cells.append(" / ".join("" if x is None else f"{100 * (x['perplexity'] / o - 1):+.2f}%" for x in (free, best)))
        lines.append(f"| {100 * b:g}% | " + " | ".join(cells) + " |")
    return lines + [""]


def _seeds(results) -> list[str]:
    """Where two files converted the same model with different calibration samples: each variant both ran,
    the second sample against the first, paired over the same windows (how much of a difference is the
    calibration sample's)."""
    lines = []
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            if a["model"] != b["model"] or a["settings"]["calib_seed"] == b["settings"]["calib_seed"]:
                continue
            rows = []
            for x in a["runs"]:
                y = next((y for y in b["runs"] if (y["variant"], y["budget"]) == (x["variant"], x["budget"])), None)
                if y is None or "window_nll" not in x or "window_nll" not in y:
                    continue
                rows.append(f"| {x['variant']} | {100 * x['budget']:g}% | {x['perplexity']:.4f} | "
                            f"{y['perplexity']:.4f} | " + " | ".join(_paired(y, x, digits=3)) + " |")
            if rows:
                lines += [f"## Calibration samples: {b['name']} (seed {b['settings']['calib_seed']}) against "
                          f"{a['name']} (seed {a['settings']['calib_seed']})", "",
                          f"| variant | budget | perplexity, seed {a['settings']['calib_seed']} | seed "
                          f"{b['settings']['calib_seed']} | seed {b['settings']['calib_seed']} vs seed "
                          f"{a['settings']['calib_seed']} (paired 95%) | verdict |",
                          "|---|---:|---:|---:|---:|---|", *rows, ""]
    return lines


def _trend(results) -> list[str]:
    """The files as points along one model's training: per point and budget, each variant's perplexity change
    against that point's original, and the paired 95% intervals of the best unhealed MoLAE variant and of G = 1
    (molae-alloc) against the best unhealed baseline (healed runs, where a point has them, are tabled only).
    Does MoLAE's margin grow or shrink as the experts train?"""
    names = list(dict.fromkeys(x["variant"] for r in results for x in r["runs"]))
    lines = ["## Along training: the margin over the best baseline", "",
             "| point | original | budget | " + " | ".join(names) + " | best MoLAE vs best baseline | "
             "molae-alloc (G = 1) vs best baseline |", "|---|---:|---:|" + "---:|" * len(names) + "---|---|"]
    for r in results:
        o = r["original"]
        for i, b in enumerate(sorted({x["budget"] for x in r["runs"]}, reverse=True)):
            runs = {x["variant"]: x for x in r["runs"] if x["budget"] == b}
            cells = [f"{100 * (runs[n]['perplexity'] / o['perplexity'] - 1):+.2f}%" if n in runs else "" for n in names]
            plain = [x for n, x in runs.items() if n not in HEALED]  # the exports are converted unhealed
            base = _best_baseline(plain)
            pairs = []
            for mol in (_best(plain, "molae"), runs.get("molae-alloc")):
                if mol is None or base is None or "window_nll" not in mol:
                    pairs.append("")
                    continue
                pairs.append(f"{mol['variant']} vs {base['variant']}: " + " ".join(_paired(mol, base)))
            head = f"| {r['name']} | {o['perplexity']:.3f} |" if i == 0 else "| | |"
            lines.append(f"{head} {100 * b:g}% | " + " | ".join(cells + pairs) + " |")
    return lines + ["", "Cells: perplexity change against the point's original; pairs: paired 95% interval over "
                    "the same windows.", ""]


def _plot(results, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        names = list(dict.fromkeys(x["variant"] for x in r["runs"]))
        for name in names:
            xs = sorted((x for x in r["runs"] if x["variant"] == name), key=lambda x: x["params"]["total"])
            ax.plot([x["params"]["total"] / 1e6 for x in xs], [x["perplexity"] for x in xs], "o-" if
                    name.startswith("molae") else "s--", label=name, markersize=4)
        o = r["original"]
        ax.plot([o["params"]["total"] / 1e6], [o["perplexity"]], "k*", markersize=12, label="original")
        ax.set_ylim(o["perplexity"] * 0.995, o["perplexity"] * 1.2)  # the competitive region; worse runs leave it
        ax.set_xlabel("total parameters (M)")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"{r['name']} (axis cut at +20% of the original)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["bench_quality", "report", "uniform_latent", "score", "variants"]


# ----------------------------------------------------------------------------- `molae bench quality`

def cmd_bench_quality(args):
    from ..command import Interrupted

    try:
        result = bench_quality(args)
    except KeyboardInterrupt:
        if not args.json.exists():
            raise
        raise Interrupted(f"the finished runs are in {args.json}: rerun the same command with --resume to skip "
                          "them, or delete that file") from None
    o = result["original"]
    print(f"{args.name}: original perplexity {o['perplexity']:.4f}; {len(result['runs'])} runs in {args.json}")


def cmd_bench_quality_report(args):

    report(args.files, args.out, args.commit, args.note.read_text().strip() if args.note else "", args.trend,
           dict(args.analysis) or None)
    print(f"wrote quality.json, quality.md and quality.png under {args.out}")


def add_commands(bench):
    """This benchmark's `molae bench` subcommands."""
    bq = add_command(bench, "quality", cmd_bench_quality, outputs={"workdir": "writable", "json": "resumable-file"},
                     devices=("device",), help="MoLAE conversion variants and the baselines at several budgets, one model",
                     description="Convert one MoE model with every MoLAE variant and baseline at each budget "
                                 "(molae convert's code), heal where asked, score all on held-out windows of a "
                                 "prepared corpus; results appended to --json (resumable).")
    bq.add_argument("--model", required=True, help="the MoE model (directory or hub id)")
    bq.add_argument("--name", required=True, help="a name for the tables")
    bq.add_argument("--data", required=True, type=existing_path,
                    help="prepared data directory: calibration, healing, scoring")
    bq.add_argument("--budgets", type=fraction_list, default=[0.75, 0.5, 0.35, 0.25],
                    help="fractions of routed-expert parameters (default 0.75,0.5,0.35,0.25)")
    bq.add_argument("--rank-ratios", type=float_list, default=[1.0, 0.8],
                    help="rank ratios of the data-free variant (1 = no step 1; default 1,0.8: the paper keeps 80%%)")
    bq.add_argument("--methods", type=comma_list(VARIANTS), default=VARIANTS,
                    help=f"variants to run (default all: {','.join(VARIANTS)})")
    bq.add_argument("--calib-tokens", type=positive_int, default=65536, help="calibration tokens (default 65536)")
    bq.add_argument("--calib-seed", type=int, default=0,
                    help="which calibration windows (default 0; run again with another seed for a second sample)")
    bq.add_argument("--heal-tokens", type=positive_int, default=1048576, help="healing tokens (default 1048576)")
    bq.add_argument("--heal-batch-size", type=positive_int, default=16, help="healing windows per step (default 16)")
    bq.add_argument("--heal-lr", type=positive_float, default=1e-4, help="healing peak learning rate (default 1e-4)")
    bq.add_argument("--eval-tokens", type=positive_int, default=262144, help="validation tokens scored (default 262144)")
    bq.add_argument("--seq-len", type=positive_int, default=512, help="window length (default 512)")
    bq.add_argument("--mobe-steps", type=positive_int, default=30000, help="MoBE Adam steps (default 30000)")
    bq.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    bq.add_argument("--workdir", required=True, type=Path, help="scratch directory for the converted models")
    bq.add_argument("--json", required=True, type=Path, help="results file (appended per run)")
    bq.add_argument("--resume", action="store_true", help="skip the runs already in --json")
    bq.add_argument("--commit", default="unknown", help="git commit, recorded")
    bq.add_argument("--device-name", default="unknown", help="the device, in words, recorded")
    bq.add_argument("--date", default="unknown", help="date, recorded")
    bq.add_argument("--command", default="", help="the exact command, recorded")

    bqr = add_command(bench, "quality-report", cmd_bench_quality_report, outputs={"out": "writable"},
                      help="tables and the Pareto plot from bench quality JSON files")
    bqr.add_argument("files", nargs="+", type=existing_path, help="JSON files of molae bench quality")
    bqr.add_argument("--out", type=Path, default=Path("results"), help="where quality.{json,md,png} go")
    bqr.add_argument("--commit", default=None, help="the commit the runs used, where the files record a wrong one")
    bqr.add_argument("--note", type=existing_path, default=None, help="a markdown file whose text goes under the title")
    bqr.add_argument("--analysis", action="append", default=[], type=named_file("analysis.json"), metavar="NAME=FILE",
                     help="a `molae analyze` analysis.json to compare the models' expert redundancy (repeatable)")
    bqr.add_argument("--trend", action="store_true",
                     help="the files are points along one model's training, in order: add a table of MoLAE's "
                          "margin over the best baseline at each")
