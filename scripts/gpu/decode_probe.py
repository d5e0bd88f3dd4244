"""[12] Where a compiled decode step's time goes, per implementation: python3 scripts/gpu/decode_probe.py OUT.json
[SPEC] (default qwen3-30b-a3b:4; bench generate's NAME:LAYERS, or a saved model's path).

`molae bench generate --compile` measured MoLAE decoding at batch 1 slower than our standard experts (541 against
646 tokens/s at Qwen3-30B-A3B:4, 8596ade) although it reads fewer bytes. For each implementation (PROBE_IMPLS,
default moe,molae) this runs bench generate's compiled greedy decode (static cache, reduce-overhead) until its speed
settles, then profiles one more generate call and reports per decode step: wall time, device time, the launches
the host made (CUDA graph replays against single kernels: what tells whether the step ran as one graph) and the
kernels by device time. With TORCH_LOGS=perf_hints (decode_probe.sh) Inductor says in the log when and why it
skipped CUDA graphs.

Here, after a run: python3 scripts/gpu/decode_probe.py --report OUT.json MD COMMIT DEVICE DATE COMMAND writes the
markdown table of a probe's JSON."""

import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from molae.bench.generate import GraphDecoder, build, greedy, settle
from molae.bench.layer import _sync

LAUNCHES = ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def probe(spec: str, impl: str, device: str, new: int = 33, loop: str = "generate") -> dict:
    """loop: generate (transformers') or graph (bench generate's GraphDecoder: one compiled step a token)."""
    torch._dynamo.reset()  # each implementation compiles from scratch (as bench generate does)
    model = build(spec, impl, device, torch.bfloat16, 0.5)
    ids = torch.randint(1, model.config.vocab_size, (1, 32), device=device)
    compile_ = device == "cuda"
    decoder = GraphDecoder(model, 32 + new, compile_) if loop == "graph" else None
    call = (lambda: decoder(ids, new)) if decoder else (lambda: greedy(model, ids, new, compile_))
    with torch.no_grad():
        warm = settle(call)
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        wall = time.perf_counter() - t0
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if compile_ else [])
        with profile(activities=acts) as prof:
            call()
            _sync(device)
    events = prof.key_averages()  # per token: over the prompt's forward and the new - 1 decode steps
    launches = {e.key: e.count for e in events if e.key in LAUNCHES}
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: -e.self_device_time_total)
    device_us = sum(e.self_device_time_total for e in kernels)
    row = dict(model=spec, impl=impl, loop=loop, new_tokens=new, warmup_calls=warm, wall_ms_per_token=wall / new * 1e3,
               device_ms_per_token=device_us / new / 1e3, launches_per_token={k: v / new for k, v in launches.items()},
               top_kernels=[dict(name=e.key[:120], calls_per_token=e.count / new,
                                 us_per_token=e.self_device_time_total / new) for e in kernels[:15]],
               params=sum(p.numel() for p in model.parameters()), torch=torch.__version__)
    return row  # the model goes with this frame


def markdown(rows: list[dict], commit: str, device: str, date: str, command: str) -> str:
    lines = [f"# [12] Compiled batch-1 decode: where a token's time goes ({rows[0]['model']})", "",
             f"Commit `{commit}`, {device}, {date}, torch {rows[0]['torch']}. Command: `{command}`.", "",
             "Per generated token, over one settled decode call (loop generate: transformers' `generate`; graph: "
             f"bench generate's GraphDecoder) of {rows[0]['new_tokens']} new tokens after a 32-token prompt (the "
             "prompt's forward included).", "",
             "| impl | loop | params | wall ms/token | device ms/token | CUDA graph replays/token | "
             "single launches/token |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lp = r["launches_per_token"]
        single = sum(v for k, v in lp.items() if k != "cudaGraphLaunch")
        lines.append(f"| {r['impl']} | {r.get('loop', 'generate')} | {r['params'] / 1e9:.2f}B | "
                     f"{r['wall_ms_per_token']:.3f} | "
                     f"{r['device_ms_per_token']:.3f} | {lp.get('cudaGraphLaunch', 0):.2f} | {single:.1f} |")
    for r in rows:
        lines += ["", f"Top kernels, {r['impl']}, {r.get('loop', 'generate')}:", "",
                  "| kernel | device us/token | calls/token |", "|---|---:|---:|"]
        lines += [f"| `{k['name'][:70]}` | {k['us_per_token']:.1f} | {k['calls_per_token']:.1f} |"
                  for k in r["top_kernels"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and sys.argv[1] == "--report":
    src, md, *meta = sys.argv[2:]
    open(md, "w").write(markdown(json.load(open(src)), *meta))
elif __name__ == "__main__":
    out, spec = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "qwen3-30b-a3b:4")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for impl, loop in [(i, lp) for i in os.environ.get("PROBE_IMPLS", "moe,molae").split(",")
                       for lp in os.environ.get("PROBE_LOOPS", "generate,graph").split(",")]:
        rows.append(probe(spec, impl, device, loop=loop))
        if device == "cuda":
            torch.cuda.empty_cache()
        r = rows[-1]
        print(f"{spec} {impl} ({loop}): {r['wall_ms_per_token']:.3f} ms/token wall, "
              f"{r['device_ms_per_token']:.3f} on the "
              f"device; launches/token {json.dumps({k: round(v, 1) for k, v in r['launches_per_token'].items()})}",
              flush=True)
        for k in r["top_kernels"][:8]:
            print(f"  {k['us_per_token']:8.1f} us/token  {k['calls_per_token']:6.1f}/token  {k['name']}", flush=True)
    json.dump(rows, open(out, "w"), indent=1)
