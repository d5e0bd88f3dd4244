"""`molae demo`: train a tiny Qwen2-MoE on the standard library, convert it, compare variants.

1. Build a small `transformers` Qwen2-MoE (byte vocabulary) and train it on the Python
   standard library's source, whole modules held out for validation (molae.data).
2. Convert it in memory with the two-step algorithm at several latent sizes d (G = 1,
   up+gate factorized, down kept), and with a per-expert truncated SVD of at most the
   same parameter count (which is MoLAE with one expert per group: G = E, d = rank).
3. Print a table (variant, expert parameters, total parameters, validation bits per byte,
   change against the original); with --out also save the model, the table as JSON and
   markdown, and a plot of bits per byte against expert parameters.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from .command import progress_bar

from .evaluate import windows_nll
from .models import find_experts, to_molae
from .train import TrainConfig, make_optimizer
from .data import byte_tokenizer, eval_windows, load_stdlib_corpus, random_batch


@dataclass
class DemoConfig:
    steps: int = 600
    seed: int = 0
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 30
    val_windows: int = 96  # x seq_len bytes of held-out code
    # model: Qwen1.5-MoE-like (fine-grained experts, a gated shared expert), tiny
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    n_experts: int = 16
    top_k: int = 2
    moe_inter: int = 64
    shared_inter: int = 128
    # conversions: latent sizes as fractions of m
    latent_fracs: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)


def build_model(cfg: DemoConfig):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    hf_cfg = Qwen2MoeConfig(
        vocab_size=256, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, intermediate_size=4 * cfg.hidden,
        moe_intermediate_size=cfg.moe_inter, shared_expert_intermediate_size=cfg.shared_inter,
        num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=False,
        max_position_embeddings=4 * cfg.seq_len,  # trained on seq_len; room for lm-eval's generation tasks
        output_router_logits=True, router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
    )
    return Qwen2MoeForCausalLM(hf_cfg)


def train(model, data, cfg: DemoConfig) -> list[float]:
    gen = torch.Generator().manual_seed(cfg.seed)
    # the trainer's AdamW (decay on matrices only) and warmup + cosine to 10% of the peak
    opt, sched = make_optimizer(model, TrainConfig(lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, min_lr_ratio=0.1,
                                                   weight_decay=0.1, betas=(0.9, 0.95)))
    model.train()
    losses = []
    bar = progress_bar(range(cfg.steps), desc="train", unit="step")
    for step in bar:
        x = random_batch(data, cfg.batch_size, cfg.seq_len - 1, gen)
        loss = model(input_ids=x, labels=x).loss  # next-byte loss + router aux loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.config.output_router_logits = False  # the aux loss is for training only
    return losses


def bits_per_byte(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-byte NLL over the windows, in bits (one token is one byte)."""
    nll, count = windows_nll(model, windows, batch, next(model.parameters()).device).tolist()
    return nll / count / math.log(2)


def expert_params(model) -> int:
    return sum(p.numel() for _, m in find_experts(model) for p in m.parameters())


def variants(cfg: DemoConfig) -> list[dict]:
    """MoLAE at each latent size, each followed by per-expert SVD with at most its parameters."""
    m, n, E = cfg.moe_inter, cfg.hidden, cfg.n_experts
    out = []
    for frac in cfg.latent_fracs:
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
    if out is not None and out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty: choose a new directory or pass --overwrite")
    numerics = pin_numerics()
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    corpus = load_stdlib_corpus()
    print(f"corpus: {corpus.manifest['root']}: train {corpus.manifest['bytes']['train']:,} bytes in "
          f"{corpus.manifest['files']['train']} files, validation {corpus.manifest['bytes']['val']:,} bytes in "
          f"{corpus.manifest['files']['val']} files ({len(corpus.manifest['val_modules'])} held-out modules)")
    print(f"numerics: {numerics['threads']} threads, {numerics['kernels']} kernels (MKL_CBWR={numerics['mkl_cbwr']}), "
          f"Python {numerics['python']}, torch {numerics['torch']}, transformers {numerics['transformers']}; "
          f"{numerics['cpu']}", flush=True)
    model = build_model(cfg)
    losses = train(model, corpus.train, cfg)
    windows = eval_windows(corpus.val, cfg.seq_len, cfg.val_windows)
    base_bpb = bits_per_byte(model, windows)
    rows = [dict(variant="original MoE", method="original", projections="", latent_dim=None, groups=None,
                 expert_params=expert_params(model), total_params=sum(p.numel() for p in model.parameters()),
                 val_bpb=base_bpb, delta_bpb=0.0, rel_error=0.0)]
    for v in progress_bar(variants(cfg), desc="convert+eval", unit="variant"):
        converted = copy.deepcopy(model)
        report = to_molae(converted, latent_dim=v["latent_dim"], groups=v["groups"], projections=("up", "gate"))
        bpb = bits_per_byte(converted, windows)
        err = math.sqrt(sum(r["rel_error"] ** 2 for r in report if r["latent_dim"]) /
                        sum(1 for r in report if r["latent_dim"]))
        rows.append(dict(variant=v["name"], method=v["method"], projections="up,gate", latent_dim=v["latent_dim"],
                         groups=v["groups"], expert_params=expert_params(converted),
                         total_params=sum(p.numel() for p in converted.parameters()), val_bpb=bpb,
                         delta_bpb=bpb - base_bpb, rel_error=err))
    result = dict(config=asdict(cfg), corpus=corpus.manifest, train_loss_first=losses[0],
                  train_loss_last=sum(losses[-10:]) / len(losses[-10:]), val_windows=len(windows),
                  val_bytes=int(windows[:, 1:].numel()), seconds=time.time() - t0, rows=rows,
                  torch=torch.__version__, numerics=numerics)
    table = markdown_table(rows)
    print(table)
    if out is not None:
        save_outputs(out, model, result, table)
        print(f"saved model, results.json, results.md and bpb_vs_params.png under {out}")
    return result


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


def save_outputs(out: Path, model, result: dict, table: str):
    """Write everything into a temporary directory beside `out`, then rename it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp / "model")
        byte_tokenizer().save_pretrained(tmp / "model")
        (tmp / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "results.md").write_text(table + "\n")
        plot(result["rows"], tmp / "bpb_vs_params.png")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
