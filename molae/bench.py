"""Benchmarks. `molae bench convert`: streaming conversion of real-sized checkpoints.

A synthetic checkpoint has a real model's exact tensor names, shapes and sharding (the names
come from transformers' own save-time conversion applied to the model built on the meta
device, so they are the hub's layout), filled with random values: conversion cost depends
on shapes, not on what the weights learned.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file
from .command import progress_bar

from .checkpoint import INDEX, parse_size

# Published configurations (the fields that set tensor shapes), for synthetic checkpoints.
QWEN15_MOE_A27B = dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                       moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                       num_experts_per_tok=4, qkv_bias=True, tie_word_embeddings=False, max_position_embeddings=8192)
DEEPSEEK_V3_LAYER = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                         moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
                         n_group=8, topk_group=4, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                         kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                         num_hidden_layers=1, first_k_dense_replace=0, tie_word_embeddings=False)


def synthetic_checkpoint(config: dict, out: Path, shard_size="4GB", dtype=torch.bfloat16, device="cpu",
                         seed: int = 0) -> dict:
    """Write a checkpoint with `config`'s tensor names and shapes (hub layout), random normal values
    (std 0.02), in shards of about `shard_size`. Returns {"bytes", "tensors", "seconds"}."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    t0 = time.perf_counter()
    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(t.shape) for k, t in revert_weight_conversion(model, model.state_dict()).items()}
    del model
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    limit, shards, buffer, size = parse_size(shard_size), [], {}, 0
    for key, shape in progress_bar(sorted(shapes.items()), desc="synthetic checkpoint", unit="tensor"):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(dtype).cpu()
        buffer[key], size = t, size + t.numel() * t.element_size()
        if size >= limit:
            shards.append(_write_shard(out, len(shards), buffer))
            buffer, size = {}, 0
    if buffer:
        shards.append(_write_shard(out, len(shards), buffer))
    weight_map, total = {}, 0
    for i, (tmp_name, keys) in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / tmp_name, out / name)
        total += (out / name).stat().st_size
        weight_map.update({k: name for k in keys})
    (out / INDEX).write_text(json.dumps(dict(metadata=dict(total_size=total), weight_map=weight_map), indent=2))
    cfg_dict = cfg.to_dict()
    cfg_dict["architectures"] = [AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    return dict(bytes=total, tensors=len(shapes), shards=len(shards), seconds=time.perf_counter() - t0)


def _write_shard(out: Path, i: int, tensors: dict):
    name = f"shard-{i:05d}.tmp"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    return name, sorted(tensors)


def run_measured(cmd: list[str]) -> dict:
    """Run a command; its wall time and peak resident memory (ru_maxrss of that child alone)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}")
    return dict(wall_s=wall, peak_rss_gb=usage.ru_maxrss * 1024 / 1e9)


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


BENCH_MODELS = {"qwen1.5-moe-a2.7b": QWEN15_MOE_A27B, "deepseek-v3-layer": DEEPSEEK_V3_LAYER}


def bench_convert(workdir: Path, which: str, config: dict, device: str, convert_args: list[str]) -> dict:
    """Generate a synthetic checkpoint of `config` (named `which`), convert it with `molae convert`
    in a child process, and measure it."""
    src, dst, report = workdir / f"{which}-src", workdir / f"{which}-molae", workdir / f"{which}-report.json"
    for p in (src, dst):
        shutil.rmtree(p, ignore_errors=True)
    made = synthetic_checkpoint(config, src, device=device if device.startswith("cuda") else "cpu")
    cmd = [sys.executable, "-m", "molae.cli", "convert", str(src), "--out", str(dst), "--device", device,
           "--report", str(report), *convert_args]
    measured = run_measured(cmd)
    summary = json.loads(report.read_text())
    layer_s = [r.get("unit_seconds") for r in summary["layers"] if r["kind"] == "gate"]  # one row per layer
    result = dict(model=which, config=config, device=device_name(device), torch=torch.__version__,
                  date=date.today().isoformat(), command=" ".join(["molae", *cmd[3:]]), source=made,
                  **measured, before=summary["before"], after=summary["after"],
                  layers_converted=summary["layers_converted"], layer_seconds=layer_s,
                  mean_rel_error={k: _mean(summary, k, "rel_error") for k in ("gate", "up", "down")},
                  mean_energy_kept={k: _mean(summary, k, "energy_kept") for k in ("gate", "up", "down")})
    for p in (src, dst):
        shutil.rmtree(p, ignore_errors=True)
    report.unlink()
    return result


def _mean(summary, kind, field):
    xs = [r[field] for r in summary["layers"] if r["kind"] == kind and r["latent_dim"]]
    return sum(xs) / len(xs) if xs else None


def write_convert_results(result: dict, results: Path, commit: str):
    """results/convert-<model>.json, then results/convert.md rendered from every such JSON there."""
    results.mkdir(parents=True, exist_ok=True)
    result = dict(result, commit=commit)
    (results / f"convert-{result['model']}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("convert-*.json"))]
    lines = ["# `molae convert` on real-sized checkpoints", "",
             "Synthetic checkpoints with the exact tensor names, shapes and hub-style sharding of the model "
             "(random bf16 values), generated on the device, then converted by `molae convert` in a child "
             "process. Wall time and peak host RSS are that process's; source and output on the device's "
             "local disk. Written by `molae bench convert` from the JSON files beside this one.", ""]
    for r in rows:
        b, a = r["before"], r["after"]
        lines += [f"## {r['model']}", "",
                  f"- command: `{r['command']}` (via `molae bench convert --model {r['model']}`)",
                  f"- device: {r['device']}, torch {r['torch']}; date {r['date']}; commit `{r['commit']}`", "",
                  "| wall time | peak host RSS | layers | s per layer (min-max) | source | output |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {r['wall_s']:.1f} s | {r['peak_rss_gb']:.2f} GB | {r['layers_converted']} | "
                  f"{min(r['layer_seconds']):.2f}-{max(r['layer_seconds']):.2f} | "
                  f"{b['bytes_on_disk'] / 1e9:.2f} GB | {a['bytes_on_disk'] / 1e9:.2f} GB |", "",
                  f"Parameters: total {b['total']:,} -> {a['total']:,}; routed experts {b['expert']:,} -> "
                  f"{a['expert']:,} ({100 * (a['expert'] - b['expert']) / b['expert']:+.1f}%). "
                  f"Mean relative error (random weights): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["mean_rel_error"].items() if v is not None) + "."]
        if r["model"] == "deepseek-v3-layer":
            per_layer = max(r["layer_seconds"])
            lines += ["", f"Extrapolated to DeepSeek-V3's 58 MoE layers: 58 x {per_layer:.1f} s = "
                          f"{58 * per_layer / 60:.1f} min of per-layer work (reading, factorizing and writing its shards), "
                          "plus start-up and the dense layers."]
        lines.append("")
    (results / "convert.md").write_text("\n".join(lines))
