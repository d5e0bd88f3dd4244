"""[12] Graph breaks and recompiles of whole models under torch.compile, per implementation (the decode step of
`molae bench generate --compile`): python3 scripts/gpu/compile_probe.py OUT.json [SPEC ...]
For each model spec (bench generate's NAME:LAYERS) and implementation, torch._dynamo.explain of the model's
forward on one token (batch 1: the decode kernels' path) and on 8; graph count, graph breaks and their reasons
with the last user frames. A model whose experts break the graph recompiles transformers' per-layer code (it
guards on layer_idx) and soon hits Dynamo's recompile limit, after which it runs eagerly."""

import json
import os
import sys

import torch

from molae.bench.generate import build

specs = sys.argv[2:] or ["qwen3-30b-a3b:2", "deepseek-v3:1"]
rows = []
for spec in specs:
    for impl in os.environ.get("PROBE_IMPLS", "hf-grouped_mm,moe,molae").split(","):
        torch._dynamo.reset()
        model = build(spec, impl, "cuda", torch.bfloat16, 0.5)
        for T in (1, 8):
            ids = torch.randint(1, 1000, (1, T), device="cuda")
            with torch.no_grad():
                ex = torch._dynamo.explain(model.forward)(input_ids=ids, use_cache=False)
            breaks = [dict(reason=str(b.reason)[:600], stack=[f"{f.filename.split('site-packages/')[-1]}:{f.lineno} "
                                                              f"{f.name}" for f in (b.user_stack or [])[-4:]])
                      for b in ex.break_reasons]
            rows.append(dict(model=spec, impl=impl, tokens=T, graphs=ex.graph_count, breaks=ex.graph_break_count,
                             reasons=breaks[:6], torch=torch.__version__))
            print(json.dumps(rows[-1])[:1500], flush=True)
        del model
        torch.cuda.empty_cache()
json.dump(rows, open(sys.argv[1], "w"), indent=1)
