"""`molae demo`: train a tiny Qwen2-MoE on the standard library, convert it, compare variants.

1. Train the `demo` preset of molae.train (a small `transformers` Qwen2-MoE over a byte vocabulary)
   on the Python standard library's source, whole modules held out for validation (molae.data),
   through the one trainer every run uses (molae.train.train).
2. Convert it in memory with the two-step algorithm at several latent sizes d (G = 1,
   up+gate factorized, down kept), and with a per-expert truncated SVD of at most the
   same parameter count (which is MoLAE with one expert per group: G = E, d = rank).
3. Print a table (variant, expert parameters, total parameters, validation bits per byte,
   change against the original); with --out also save the model, the run's log and summary, the
   table as JSON and markdown, and a plot of bits per byte against expert parameters.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .checkpoint import check_destination, publish, temp_dir_for
from .command import Interrupted, progress_bar
from .data import CorpusTokens, eval_windows, load_stdlib_corpus
from .evaluate import windows_nll
from .models import find_experts, to_molae
from .train import PRESETS, TrainConfig, read_log, train


@dataclass
class DemoConfig:
    steps: int = 600  # of the `demo` training preset (16 x 256 bytes a step)
    seed: int = 0
    val_windows: int = 96  # x seq_len bytes of held-out code
    latent_fracs: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # conversions: latent sizes as fractions of m

    def train_config(self) -> TrainConfig:
        """The `demo` preset with this run's steps, seed and validation size (evaluated and saved once,
        at the end)."""
        base = PRESETS["demo"]
        return replace(base, steps=self.steps, seed=self.seed, eval_tokens=self.val_windows * base.seq_len,
                       eval_every=self.steps, ckpt_every=self.steps, log_every=min(base.log_every, self.steps))


def bits_per_byte(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-byte NLL over the windows, in bits (one token is one byte)."""
    nll, count = windows_nll(model, windows, batch, next(model.parameters()).device).tolist()
    return nll / count / math.log(2)


def expert_params(model) -> int:
    return sum(p.numel() for _, m in find_experts(model) for p in m.parameters())


def variants(m: int, n: int, E: int, latent_fracs) -> list[dict]:
    """MoLAE at each latent size, each followed by per-expert SVD with at most its parameters."""
    out = []
    for frac in latent_fracs:
        d = max(1, round(frac * m))
        out.append(dict(name=f"MoLAE d={d}", method="molae", latent_dim=d, groups=1))
        rank = (d * n + E * m * d) // (E * (m + n))  # per kind: E*r*(m+n) <= d*n + E*m*d
        out.append(dict(name=f"SVD rank={rank}", method="svd", latent_dim=rank, groups=E))
    return out


DEMO_THREADS = 2  # the figures depend on the thread count: fixed, so every machine computes the same sums
KERNELS = "avx2"  # and on the vector kernels MKL and PyTorch pick per CPU: pinned to AVX2, which x86-64 CPUs share


def pin_numerics() -> dict:
    """Fix what the demo's figures depend on beyond its seed: the thread count, and the vector kernels
    of MKL (MKL_CBWR, its conditional numerical reproducibility) and of PyTorch (ATEN_CPU_CAPABILITY).
    Both variables are read at the first computation, so this must run before any; what took effect is
    returned (a process that computed before would keep its native kernels) and recorded."""
    import platform

    import transformers

    os.environ.setdefault("MKL_CBWR", KERNELS.upper())
    os.environ.setdefault("ATEN_CPU_CAPABILITY", KERNELS)
    torch.set_num_threads(DEMO_THREADS)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return dict(threads=torch.get_num_threads(), kernels=torch.backends.cpu.get_cpu_capability(),
                mkl_cbwr=os.environ["MKL_CBWR"], cpu=cpu, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__)


def run_demo(cfg: DemoConfig, out: Path | None = None, overwrite: bool = False) -> dict:
    if out is not None:
        check_destination(Path(out), overwrite)
    numerics = pin_numerics()
    t0 = time.time()
    corpus = load_stdlib_corpus()
    print(f"corpus: {corpus.manifest['root']}: train {corpus.manifest['bytes']['train']:,} bytes in "
          f"{corpus.manifest['files']['train']} files, validation {corpus.manifest['bytes']['val']:,} bytes in "
          f"{corpus.manifest['files']['val']} files ({len(corpus.manifest['val_modules'])} held-out modules)")
    print(f"numerics: {numerics['threads']} threads, {numerics['kernels']} kernels (MKL_CBWR={numerics['mkl_cbwr']}), "
          f"Python {numerics['python']}, torch {numerics['torch']}, transformers {numerics['transformers']}; "
          f"{numerics['cpu']}", flush=True)
    # the run goes to a temporary directory (beside --out, renamed into place at the end)
    work = contextlib.nullcontext(temp_dir_for(Path(out))) if out is not None else tempfile.TemporaryDirectory()
    with work as run_dir:
        run_dir = Path(run_dir)
        try:
            if out is not None:
                shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted demo left
            result, table = _train_and_compare(cfg, corpus, run_dir, numerics, t0)
            if out is not None:
                (run_dir / "checkpoint.pt").unlink()  # the optimizer state: nothing resumes a finished demo
                (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
                (run_dir / "results.md").write_text(table + "\n")
                plot(result["rows"], run_dir / "bpb_vs_params.png")
                publish(run_dir, Path(out), overwrite)
                print(f"saved model, results.json, results.md and bpb_vs_params.png under {out}")
        except Interrupted:  # the trainer kept its checkpoint; a demo keeps nothing
            shutil.rmtree(run_dir, ignore_errors=True)
            raise KeyboardInterrupt from None
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
    return result


def _train_and_compare(cfg: DemoConfig, corpus, run_dir: Path, numerics: dict, t0: float) -> tuple[dict, str]:
    """Train the preset into run_dir (model/, log.jsonl, summary.json), then convert and evaluate."""
    from transformers import AutoModelForCausalLM

    train_cfg = cfg.train_config()
    train(train_cfg, CorpusTokens(corpus), run_dir, device="cpu", progress=True)  # a CPU demo, on any machine
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    windows = eval_windows(corpus.val, train_cfg.seq_len, cfg.val_windows)  # the trainer's validation windows
    base_bpb = bits_per_byte(model, windows)
    rows = [dict(variant="original MoE", method="original", projections="", latent_dim=None, groups=None,
                 expert_params=expert_params(model), total_params=sum(p.numel() for p in model.parameters()),
                 val_bpb=base_bpb, delta_bpb=0.0, rel_error=0.0)]
    c = model.config
    for v in progress_bar(variants(c.moe_intermediate_size, c.hidden_size, c.num_experts, cfg.latent_fracs),
                          desc="convert+eval", unit="variant"):
        converted = copy.deepcopy(model)
        report = to_molae(converted, latent_dim=v["latent_dim"], groups=v["groups"], projections=("up", "gate"))
        bpb = bits_per_byte(converted, windows)
        err = math.sqrt(sum(r["rel_error"] ** 2 for r in report if r["latent_dim"]) /
                        sum(1 for r in report if r["latent_dim"]))
        rows.append(dict(variant=v["name"], method=v["method"], projections="up,gate", latent_dim=v["latent_dim"],
                         groups=v["groups"], expert_params=expert_params(converted),
                         total_params=sum(p.numel() for p in converted.parameters()), val_bpb=bpb,
                         delta_bpb=bpb - base_bpb, rel_error=err))
    train_log = [(r["step"], r["loss"]) for r in read_log(run_dir / "log.jsonl") if "tokens_per_s" in r]
    result = dict(config=dict(demo=asdict(cfg), train=asdict(train_cfg)), corpus=corpus.manifest,
                  train_loss=train_log, val_windows=len(windows), val_bytes=int(windows[:, 1:].numel()),
                  seconds=time.time() - t0, rows=rows, torch=torch.__version__, numerics=numerics)
    table = markdown_table(rows)
    print(table)
    return result, table


def markdown_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| variant | expert params | total params | val bits/byte | change vs original |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        change = "" if r is base else f"{r['delta_bpb']:+.4f} ({100 * r['delta_bpb'] / base['val_bpb']:+.1f}%)"
        share = f" ({100 * r['expert_params'] / base['expert_params']:.0f}%)"
        lines.append(f"| {r['variant']} | {r['expert_params']:,}{share} | {r['total_params']:,} | "
                     f"{r['val_bpb']:.4f} | {change} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, style in (("molae", "o-"), ("svd", "s--")):
        pts = sorted((r["expert_params"], r["val_bpb"], r["variant"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                    label="MoLAE (G=1, up+gate)" if method == "molae" else "per-expert SVD")
    base = rows[0]
    ax.plot([base["expert_params"]], [base["val_bpb"]], "k*", markersize=12, label="original MoE")
    ax.set_xlabel("routed-expert parameters")
    ax.set_ylabel("validation bits per byte (held-out stdlib modules)")
    ax.set_title("molae demo: conversion cost against expert parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
