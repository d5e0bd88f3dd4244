"""[8] the layer-by-layer pipeline against the in-memory path it replaced, on one trained reference model
(run by scripts/gpu/pipeline_quality.sh on the GPU; `--report` renders the markdown locally).

    python scripts/gpu/pipeline_quality.py MODEL DATA WORK OUT.json --commit C --old O --device-name N --command CMD
    python scripts/gpu/pipeline_quality.py --report results/pipeline_quality.json results/pipeline_quality.md

Every variant converts MODEL at each budget (calibrated on DATA's training split, --budget, gate,up,down) and is
scored on the same held-out windows; the paired bootstrap over windows gives a 95% interval for each variant's
perplexity change against the old code's conversion at the same budget.
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

BUDGETS = (0.5, 0.25)
def variants(model, data, device="cuda", calib_tokens=65536):
    """(name, the command's molae arguments, code tree, whole-model heal after it?). "pipeline" is `molae convert`
    with the commit's defaults: up to 76b81ba that carried the converted layers' outputs (`--calib-carry
    converted`, then the default, and "pipeline, carry original" the alternative); since, the original's."""
    out = []
    for b in BUDGETS:
        base = ["convert", model, "--budget", str(b), "--calibration", data, "--projections", "gate,up,down",
                "--calib-tokens", str(calib_tokens), "--calib-seq-len", "512", "--device", device]
        out += [(f"old in-memory path@{b}", base, "old", False),
                (f"pipeline@{b}", base, "new", False),  # the default --calib-carry original
                (f"pipeline, carry converted@{b}", base + ["--calib-carry", "converted"], "new", False),
                (f"pipeline + layer-wise heal@{b}", base + ["--heal-steps", "300"], "new", False),
                (f"pipeline, carry converted + layer-wise heal@{b}", base + ["--calib-carry", "converted",
                                                                           "--heal-steps", "300"], "new", False),
                (f"pipeline + whole-model heal@{b}", base, "new", True),
                (f"pipeline + layer-wise + whole-model heal@{b}", base + ["--heal-steps", "300"], "new", True)]
    return out


def run(args, tree, env_root):
    """One molae command of a code tree ("old": .old/, "new": this checkout), by scripts/in_tree.py: with
    `python -m molae.cli` the current directory's molae would shadow .old's whatever PYTHONPATH says."""
    code = env_root / ".old" if tree == "old" else env_root
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(env_root / "scripts" / "in_tree.py"), code, *map(str, args)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))}: {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def bootstrap(new, old):
    """95% interval of exp(mean(new) - mean(old)) - 1 over resampled windows (paired: same windows)."""
    from molae.evaluate import paired_change

    return list(paired_change(new, old)[1:])


def measure(a):
    import torch

    from molae.data import TokenData
    from molae.evaluate import load
    from molae.evaluate import window_bytes, window_nlls

    root = Path.cwd()
    data = TokenData(a.data)
    windows = data.val_windows(512, a.eval_tokens)
    n_bytes = window_bytes(data.tokenizer(), windows)
    tokens = windows[:, 1:].shape[1]

    def score(path):
        model = load(str(path), a.device, "float32", need_tokenizer=False)[0]
        nll = window_nlls(model, windows, 16, a.device).cpu() / tokens  # mean NLL per window
        del model
        if a.device == "cuda":
            torch.cuda.empty_cache()
        return nll

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    orig = score(a.model)
    result = dict(model=a.model, commit=a.commit, old_commit=a.old, device=a.device_name, date=date.today().isoformat(),
                  command=a.command, eval_windows=len(windows), eval_tokens=int(windows[:, 1:].numel()),
                  eval_bytes=n_bytes, original=dict(perplexity=math.exp(orig.mean()), loss=float(orig.mean())),
                  trained=json.loads(Path(a.model).parent.joinpath("summary.json").read_text()), runs=[])
    nlls = {}
    for name, args, tree, whole in variants(a.model, a.data, a.device, a.calib_tokens):
        if a.variants and name.split("@")[0] not in a.variants.split(";"):
            continue
        dst = work / name.replace(" ", "_").replace(",", "").replace("@", "-")
        seconds = run([*args, "--out", dst, "--overwrite"], tree, root)
        if whole:
            seconds += run(["heal", dst, "--teacher", a.model, "--data", a.data, "--tokens", a.heal_tokens,
                            "--seq-len", 512, "--batch-size", 16, "--device", a.device], tree, root)
        nll = score(dst)
        nlls[name] = nll
        budget = name.split("@")[1]
        old = nlls.get(f"old in-memory path@{budget}")
        stored = json.loads((dst / "config.json").read_text())
        run_ = dict(variant=name.split("@")[0], budget=float(budget), seconds=seconds, loss=float(nll.mean()),
                    perplexity=math.exp(nll.mean()), bits_per_byte=float(nll.sum() * tokens / math.log(2) / n_bytes),
                    change=math.exp(nll.mean() - orig.mean()) - 1, change_95=bootstrap(nll, orig),
                    latent={k: v["latent"] for k, v in stored["molae"]["layers"].items()})
        if old is not None and nll is not old:
            run_["vs_old"], run_["vs_old_95"] = math.exp(nll.mean() - old.mean()) - 1, bootstrap(nll, old)
        result["runs"].append(run_)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: perplexity {run_['perplexity']:.4f} ({100 * run_['change']:+.2f}%) in {seconds:.0f} s", flush=True)
        shutil.rmtree(dst)


def report(src, out):
    r = json.loads(Path(src).read_text())
    pct = lambda x: f"{100 * x:+.2f}%"  # noqa: E731
    ci = lambda xs: f"[{100 * xs[0]:+.2f}, {100 * xs[1]:+.2f}]"  # noqa: E731
    lines = ["# The layer-by-layer pipeline against the in-memory path ([8])", "",
             f"- command: `{r['command']}`", f"- device: {r['device']}; date {r['date']}; commit `{r['commit']}` "
             f"(old code: `{r['old_commit']}`)",
             f"- reference model: `{r['trained']['config']['name']}` trained {r['trained']['tokens']:,} tokens in this call "
             f"(validation loss {r['trained']['final_val_loss']:.3f}); scored on {r['eval_windows']} held-out windows "
             f"({r['eval_tokens']:,} tokens); original perplexity {r['original']['perplexity']:.4f}",
             "- every variant: `--budget B --projections gate,up,down --calibration DATA --calib-tokens 65536`; "
             "intervals: 95%, paired bootstrap over the windows",
             "- \"pipeline\" is `molae convert` with the commit's defaults; up to `76b81ba` the default was "
             "`--calib-carry converted` (so there \"pipeline\" carries converted outputs and \"pipeline, carry "
             "original\" is the alternative); since then it is `--calib-carry original`", "",
             "| budget | variant | perplexity | change vs original (95%) | vs old path (95%) | seconds |",
             "|---:|---|---:|---:|---:|---:|"]
    for x in r["runs"]:
        vs = f"{pct(x['vs_old'])} {ci(x['vs_old_95'])}" if "vs_old" in x else ""
        lines.append(f"| {x['budget']:g} | {x['variant']} | {x['perplexity']:.4f} | {pct(x['change'])} "
                     f"{ci(x['change_95'])} | {vs} | {x['seconds']:.0f} |")
    Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        report(sys.argv[2], sys.argv[3])
        sys.exit(0)
    p = argparse.ArgumentParser()
    for name in ("model", "data", "work", "out"):
        p.add_argument(name)
    for flag in ("--commit", "--old", "--device-name", "--command"):
        p.add_argument(flag, default="unknown")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default="", help="variant names to run, separated by ; (default: all)")
    for flag, default in (("--calib-tokens", 65536), ("--eval-tokens", 131072), ("--heal-tokens", 1048576)):
        p.add_argument(flag, type=int, default=default)
    measure(p.parse_args())
