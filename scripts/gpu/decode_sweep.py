"""[12] The decode kernels' launch constants, swept on the GPU: whole MoLAE decode layers (Experts.forward_decode,
CUDA-graph replays after an L2 flush, as `molae bench layer` times decode) for every combination of the five
constants in molae.kernels (BLOCK_ROWS, BLOCK_IN, GEMV_WARPS, SPLIT_PROGRAMS_PER_SM, SWIGLU_ONE_LOOP), at the
shapes and token counts where the decode targets are measured. Each configuration's output is checked against the
current constants' first (a configuration that computes something else is reported, not timed).
    python3 scripts/gpu/decode_sweep.py OUT_DIR [--shapes qwen3-30b-a3b deepseek-v3] [--tokens 1,4,8]
writes OUT_DIR/decode_sweep.{json,md}: per (shape, tokens) the current constants' time, the fastest configuration's,
and each one's fraction of the copy bandwidth measured in the same run. --per-kernel: instead, each decode kernel's
own (rows, block_in, warps) over the grid's values while the others keep the shared constants
(molae.kernels.LAUNCH_OVERRIDES), 18 configurations a kernel: which kernel wants what. Measures only:
molae.kernels' constants change in a commit that cites this table."""
import argparse
import itertools
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from molae import kernels as K
from molae.bench.layer import build, graphed, inputs, l2_flush, measure_ceilings, median_ms, parse_shape, weight_bytes

# 72 configurations (2 warps left out: these kernels stream weights, and fewer warps keep fewer loads in flight)
GRID = dict(BLOCK_ROWS=(8, 16, 32), BLOCK_IN=(128, 256, 512), GEMV_WARPS=(4, 8), SPLIT_PROGRAMS_PER_SM=(4, 8),
            SWIGLU_ONE_LOOP=(False, True))


def configs(grid: dict, per_kernel: bool):
    """The configurations to time: module constants of molae.kernels to set (and, per kernel, which kernel)."""
    if not per_kernel:
        for values in itertools.product(*grid.values()):
            yield dict(zip(grid, values))
        return
    for kernel in K.DECODE_KERNELS:
        for launch in itertools.product(grid["BLOCK_ROWS"], grid["BLOCK_IN"], grid["GEMV_WARPS"]):
            yield dict(kernel=kernel, LAUNCH_OVERRIDES={kernel: launch})


def apply(config: dict, current: dict):
    for k, v in {**current, "LAUNCH_OVERRIDES": {}, **config}.items():
        if k != "kernel":
            setattr(K, k, v)


def is_current(row: dict, current: dict) -> bool:
    if "kernel" in row:
        return tuple(row["LAUNCH_OVERRIDES"][row["kernel"]]) == (current["BLOCK_ROWS"], current["BLOCK_IN"],
                                                                 current["GEMV_WARPS"])
    return all(row[k] == v for k, v in current.items())


def time_config(module, sets, device, flush) -> float:
    def step(i):
        with torch.no_grad():
            s = sets[i]
            return module.forward_decode(s["x"], s["idx"], s["w"])
    cuda = torch.device(device).type == "cuda"
    return median_ms(graphed(step, len(sets)) if cuda else step, len(sets), device, before=flush, target_s=0.1)["ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b", "deepseek-v3"], help="presets or n,m,E,k")
    ap.add_argument("--tokens", default="1,4,8")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--device", default="cuda", help="cuda (a CPU run under TRITON_INTERPRET=1 checks the script)")
    ap.add_argument("--peak-size", type=int, default=4096, help="matrix size of the ceilings' measurement")
    ap.add_argument("--grid", type=json.loads, default=GRID, help="the constants' values, JSON (default: GRID)")
    ap.add_argument("--per-kernel", action="store_true", help="each kernel's launch constants on their own")
    a = ap.parse_args()
    dev, dt = a.device, torch.bfloat16
    copy = measure_ceilings(dev, dt, a.peak_size)["copy_tb_s"]
    flush = l2_flush(dev)
    grid = {k: tuple(a.grid[k]) for k in GRID}
    current = {k: getattr(K, k) for k in grid}
    rows = []
    for name in a.shapes:
        shape = parse_shape(name)
        module = build("molae-g1", shape, dev, dt).requires_grad_(False)
        gen = torch.Generator(dev).manual_seed(0)
        for T in (int(t) for t in a.tokens.split(",")):
            sets = inputs(shape, T, 3, dev, dt, gen)
            wb = sum(weight_bytes(module, shape, "molae-g1", s["idx"]) for s in sets) / len(sets)
            with torch.no_grad():  # the current constants' output (tests/test_cuda.py holds it to float64)
                want = module.forward_decode(sets[0]["x"], sets[0]["idx"], sets[0]["w"]).float()
            for config in configs(grid, a.per_kernel):
                apply(config, current)
                with torch.no_grad():
                    got = module.forward_decode(sets[0]["x"], sets[0]["idx"], sets[0]["w"]).float()
                err = ((got - want).norm() / want.norm()).item()
                row = dict(shape=name, tokens=T, **config, rel_err=err, weight_bytes=wb)
                if err < 1e-2:  # only the order of the sums differs
                    ms = time_config(module, sets, dev, flush)
                    row.update(ms=ms, bandwidth_fraction=wb / ms / 1e9 / copy)
                rows.append(row)
                print(json.dumps(row), flush=True)
            apply({}, current)
        del module
        if torch.device(dev).type == "cuda":
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if torch.device(dev).type == "cuda" else dev
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    result = dict(command="python3 scripts/gpu/decode_sweep.py " + " ".join(sys.argv[1:]), device=device, date=date,
                  commit=a.commit, torch=torch.__version__, copy_tb_s=copy, current=current, grid=grid, rows=rows)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "decode_sweep.json").write_text(json.dumps(result, indent=1))
    lines = ["# Decode kernels' launch constants, swept ([12])", "",
             f"- command: `{result['command']}`; device {device}; date {date}; commit `{a.commit}`; "
             f"torch {torch.__version__}; copy bandwidth {copy:.2f} TB/s measured in the same run",
             f"- current constants: {current}; the grid: {grid}", "",
             "| shape | tokens | kernel | current ms (bandwidth) | fastest ms (bandwidth) | fastest constants | "
             "wrong configs |", "|---|---:|---|---:|---:|---|---:|"]
    keys = ["LAUNCH_OVERRIDES"] if a.per_kernel else list(grid)
    for (name, T, kernel), group in itertools.groupby(rows, key=lambda r: (r["shape"], r["tokens"],
                                                                            r.get("kernel", "all"))):
        group = list(group)
        timed = [r for r in group if "ms" in r]
        cur = next((r for r in timed if is_current(r, current)), None)
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        cell = lambda r: f"{r['ms']:.4f} ({100 * r['bandwidth_fraction']:.0f}%)" if r else ""  # noqa: E731
        lines.append(f"| {name} | {T} | {kernel} | {cell(cur)} | {cell(best)} | "
                     f"{ {k: best[k] for k in keys} if best else ''} | {len(group) - len(timed)} |")
    (a.out / "decode_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
