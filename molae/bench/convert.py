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
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file
from ..checkpoint import INDEX, parse_size
from ..presets import REAL_MODELS, moe_layer_count
from ..command import add_command, existing_path, fraction, positive_int, progress_bar, projection_list

# Synthetic checkpoints of the real models (molae/presets.py); a DeepSeek-V3 checkpoint of its MoE layers
# alone (its first three are dense): first_k_dense_replace=0 keeps every benchmarked layer MoE.
QWEN15_MOE_A27B, QWEN3_30B_A3B, MIXTRAL_8X7B = (REAL_MODELS[k] for k in ("qwen1.5-moe-a2.7b", "qwen3-30b-a3b",
                                                                     "mixtral-8x7b"))
DEEPSEEK_V3_LAYER = dict(REAL_MODELS["deepseek-v3"], num_hidden_layers=1, first_k_dense_replace=0)
# the whole models' MoE layer counts, for extrapolating a per-layer time
FULL_MOE_LAYERS = {"qwen1.5-moe-a2.7b": moe_layer_count("qwen1.5-moe-a2.7b"),
                   "qwen3-30b-a3b": moe_layer_count("qwen3-30b-a3b"), "mixtral-8x7b": moe_layer_count("mixtral-8x7b"),
                   "deepseek-v3-layer": moe_layer_count("deepseek-v3")}
FP8_BLOCK = (128, 128)


def synthetic_checkpoint(config: dict, out: Path, shard_size="4GB", dtype=torch.bfloat16, device="cpu",
                         seed: int = 0, fp8: bool = False) -> dict:
    """Write a checkpoint with `config`'s tensor names and shapes (hub layout), random normal values
    (std 0.02), in shards of about `shard_size`. fp8: the 2-D projection weights (attention, experts,
    shared experts; not embeddings, norms or routers) block-quantized to float8_e4m3fn with
    `weight_scale_inv` per 128 x 128 block, as DeepSeek-V3 ships. Returns {"bytes", "tensors", "seconds"}."""
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
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02)
        parts = {key: t.to(dtype).cpu()}
        if fp8 and len(shape) == 2 and key.endswith("proj.weight"):
            parts = dict(zip((key, key.removesuffix("weight") + "weight_scale_inv"), (x.cpu() for x in fp8_blocks(t))))
        for k, p in parts.items():
            buffer[k], size = p, size + p.numel() * p.element_size()
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
    if fp8:
        cfg_dict["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                               weight_block_size=list(FP8_BLOCK))
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    return dict(bytes=total, tensors=len(shapes), shards=len(shards), seconds=time.perf_counter() - t0, fp8=fp8)


def fp8_blocks(W: torch.Tensor, block=FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [r, c], scale_inv float32 [ceil(r/b), ceil(c/b)]) with W ~ q * scale_inv per block."""
    (r, c), (br, bc) = W.shape, block
    pad = torch.zeros(-(-r // br) * br, -(-c // bc) * bc, dtype=torch.float32, device=W.device)
    pad[:r, :c] = W.float()
    blocks = pad.view(pad.shape[0] // br, br, pad.shape[1] // bc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0  # e4m3's largest finite value
    q = (blocks / scale[:, None, :, None]).view_as(pad)[:r, :c].to(torch.float8_e4m3fn)
    return q, scale


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


BENCH_MODELS = {"qwen1.5-moe-a2.7b": QWEN15_MOE_A27B, "qwen3-30b-a3b": QWEN3_30B_A3B, "mixtral-8x7b": MIXTRAL_8X7B,
                "deepseek-v3-layer": DEEPSEEK_V3_LAYER}


def bench_convert(workdir: Path, which: str, config: dict, device: str, convert_args: list[str],
                  layers: int | None = None, fp8: bool = False, keep_source: bool = False) -> dict:
    """Generate a synthetic checkpoint of `config` (named `which`; `layers` decoder layers if given, fp8
    sources if asked), convert it with `molae convert` in a child process that reports its own peak GPU
    memory, and measure it (wall time, peak host RSS, seconds per layer, the budget's first pass).
    keep_source: leave the synthetic checkpoint for the next run of the same model and shapes (which
    then reuses it instead of generating it again)."""
    config = dict(config, num_hidden_layers=layers or config["num_hidden_layers"])
    src, dst, report = workdir / f"{which}-src", workdir / f"{which}-molae", workdir / f"{which}-report.json"
    peak, made_json = workdir / f"{which}-peak.json", workdir / f"{which}-src.json"
    want = dict(config=config, fp8=fp8)
    shutil.rmtree(dst, ignore_errors=True)
    if made_json.is_file() and json.loads(made_json.read_text())["want"] == want and src.is_dir():
        made = json.loads(made_json.read_text())["made"]
    else:
        shutil.rmtree(src, ignore_errors=True)
        made = synthetic_checkpoint(config, src, device=device if device.startswith("cuda") else "cpu", fp8=fp8)
        made_json.write_text(json.dumps(dict(want=want, made=made)))
    args = ["convert", str(src), "--out", str(dst), "--device", device, "--report", str(report), *convert_args]
    measured = run_measured([sys.executable, "-c", CHILD, str(peak), *args])
    summary = json.loads(report.read_text())
    layer_s = [r.get("unit_seconds") for r in summary["layers"] if r["kind"] == "gate"]  # one row per layer
    L, calibrated = config["num_hidden_layers"], "--calibration" in convert_args
    startup = measured["wall_s"] - sum(layer_s) - (summary.get("allocate_seconds") or 0)
    per_layer = statistics.median(layer_s) + (summary.get("allocate_seconds") or 0) / max(len(layer_s), 1)
    full = FULL_MOE_LAYERS.get(which)
    result = dict(model=which, config=config, layers=L, fp8=fp8, calibrated=calibrated,
                  device=device_name(device), torch=torch.__version__, date=date.today().isoformat(),
                  command=" ".join(["molae", *args]), source=made, **measured,
                  peak_gpu_gb=json.loads(peak.read_text())["peak_gpu_gb"], before=summary["before"],
                  after=summary["after"], layers_converted=summary["layers_converted"], layer_seconds=layer_s,
                  allocate_seconds=summary.get("allocate_seconds"), startup_seconds=startup,
                  seconds_per_layer=per_layer,
                  extrapolated_minutes=None if full is None else (startup + full * per_layer) / 60,
                  mean_rel_error={k: _mean(summary, k, "rel_error") for k in ("gate", "up", "down")},
                  mean_rel_output_error={k: _mean(summary, k, "rel_output_error") for k in ("gate", "up", "down")})
    shutil.rmtree(dst, ignore_errors=True)
    if not keep_source:
        shutil.rmtree(src, ignore_errors=True)
        made_json.unlink()
    report.unlink()
    peak.unlink()
    return result


def _mean(summary, kind, field):
    xs = [r[field] for r in summary["layers"] if r["kind"] == kind and r.get(field) is not None]
    return sum(xs) / len(xs) if xs else None


def result_name(result: dict) -> str:
    mode = ("calibrated" if result.get("calibrated") else "data-free") + ("-fp8" if result.get("fp8") else "")
    return f"{result['model']}-{result.get('layers', result.get('layers_converted'))}L-{mode}-{result['commit']}"


def write_convert_results(result: dict, results: Path, commit: str):
    """results/convert/<name>.json, then results/convert.md rendered from every such JSON there."""
    (results / "convert").mkdir(parents=True, exist_ok=True)
    result = dict(result, commit=commit)
    (results / "convert" / f"{result_name(result)}.json").write_text(json.dumps(result, indent=2) + "\n")
    render_convert_results(results)


def render_convert_results(results: Path):
    """results/convert.md from every results/convert/*.json (newest commit's runs first within a model)."""
    rows = [json.loads(p.read_text()) for p in sorted((results / "convert").glob("*.json"))]
    rows.sort(key=lambda r: (r["model"], r.get("layers", 0), bool(r.get("calibrated")), r["date"]))
    lines = ["# `molae convert` on real-sized checkpoints", "",
             "Synthetic checkpoints with the exact tensor names, shapes and hub-style sharding of the model "
             "(random bf16 values, or fp8 with 128 x 128 block scales as DeepSeek-V3 ships), generated on the "
             "device, then converted by `molae convert` in a child process. Wall time, peak host RSS and peak "
             "GPU memory (torch's allocator) are that process's; source and output on the device's local disk. "
             "Seconds per layer: the median layer's read, calibration, conversion and write, plus an even share "
             "of --budget's first pass (every layer's spectra, before any is converted); the whole-model time "
             "is start-up plus the model's MoE layer count times that. Written by `molae bench convert` from "
             "the JSON files in convert/.", "",
             "| model | layers | source | mode (options beyond --device cuda) | commit | wall | start-up | s per layer | "
             "peak GPU | peak host RSS | source | output | whole model (extrapolated) |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mode = "calibrated" if r.get("calibrated") else "data-free"
        words = r["command"].split()
        extra = " ".join(words[words.index("--report") + 2:]) if "--report" in words else ""
        opt = lambda key, fmt: fmt.format(r[key]) if r.get(key) is not None else "-"  # noqa: E731
        lines.append(f"| {r['model']} | {r.get('layers', r['layers_converted'])} | {'fp8' if r.get('fp8') else 'bf16'} | "
                     f"{mode}{f' `{extra}`' if extra else ''} | `{r['commit']}` | {r['wall_s']:.1f} s | "
                     f"{opt('startup_seconds', '{:.1f} s')} | "
                     f"{r.get('seconds_per_layer', max(r['layer_seconds'])):.2f} | {opt('peak_gpu_gb', '{:.1f} GB')} | "
                     f"{r['peak_rss_gb']:.1f} GB | {r['source']['bytes'] / 1e9:.1f} GB | "
                     f"{r['after']['bytes_on_disk'] / 1e9:.1f} GB | {opt('extrapolated_minutes', '{:.1f} min')} |")
    lines += ["", "Each run's command, device, date and commit:", ""]
    for r in rows:
        lines.append(f"- {result_name(r)}: `{r['command']}` ({r['device']}, torch {r['torch']}, {r['date']}, "
                     f"commit `{r['commit']}`)")
    (results / "convert.md").write_text("\n".join(lines) + "\n")


# The child process: the molae command, then its own peak GPU memory (code run with `python -c`, so this
# module does not import the CLI that imports it)
CHILD = """import json, sys, torch
from molae.cli import main
code = main(sys.argv[2:])
peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
open(sys.argv[1], "w").write(json.dumps(dict(peak_gpu_gb=peak)))
sys.exit(code)
"""


# ----------------------------------------------------------------------------- `molae bench convert`

def cmd_bench_convert(args):

    extra = ["--latent-dim", str(args.latent_dim)] if args.latent_dim else []
    extra += ["--budget", str(args.budget)] if args.budget else []
    extra += ["--projections", ",".join(args.projections)] if args.projections else []
    runs = [extra]
    if args.calibration:  # the data-free run first, on the same synthetic checkpoint, when asked
        runs = [extra] * args.with_data_free + [extra + ["--calibration", str(args.calibration), "--calib-tokens",
                                                        str(args.calib_tokens)]]
    for model in args.model:
        for j, run_args in enumerate(runs):
            result = bench_convert(args.workdir, model, BENCH_MODELS[model], args.device, run_args, args.layers,
                                   args.fp8, keep_source=j + 1 < len(runs))
            write_convert_results(result, args.results, args.commit)
            print(json.dumps({k: result[k] for k in ("model", "layers", "calibrated", "fp8", "wall_s", "peak_rss_gb",
                                                     "peak_gpu_gb", "seconds_per_layer", "extrapolated_minutes")}))


def add_commands(bench):
    """This benchmark's `molae bench` subcommands."""

    bc = add_command(bench, "convert", cmd_bench_convert, outputs={"workdir": "writable", "results": "writable"},
                     devices=("device",), help="convert synthetic checkpoints of real models' shapes; time and memory",
                     description="Generate a checkpoint with a real model's exact shapes (random values) and "
                                 "time `molae convert` on it (wall time, peak host RSS, seconds per layer).")
    bc.add_argument("--model", action="append", required=True, choices=list(BENCH_MODELS),
                    help="which checkpoint (repeatable)")
    bc.add_argument("--workdir", type=Path, required=True, help="scratch directory for the checkpoints")
    bc.add_argument("--device", default="cuda", help="device for the SVDs (default cuda)")
    bc.add_argument("--latent-dim", type=positive_int, default=None, help="passed to molae convert")
    bc.add_argument("--budget", type=fraction, default=None, help="passed to molae convert")
    bc.add_argument("--projections", type=projection_list, default=None, help="passed to molae convert")
    bc.add_argument("--calibration", type=existing_path, default=None,
                    help="calibration text or prepared directory, passed to molae convert (the calibrated pipeline)")
    bc.add_argument("--calib-tokens", type=positive_int, default=16384, help="calibration tokens (default 16384)")
    bc.add_argument("--layers", type=positive_int, default=None,
                    help="decoder layers of the synthetic checkpoint (default: the model's)")
    bc.add_argument("--fp8", action="store_true", help="write block-quantized fp8 sources (DeepSeek-V3's format)")
    bc.add_argument("--with-data-free", action="store_true",
                    help="with --calibration: first convert the same synthetic checkpoint data-free, for comparison")
    bc.add_argument("--results", type=Path, default=Path("results"), help="where convert-*.json and convert.md go")
    bc.add_argument("--commit", default="unknown", help="the git commit being measured, recorded in the results")
