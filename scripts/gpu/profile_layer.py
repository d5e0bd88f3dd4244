"""Kernel-time breakdown of one experts step (torch.profiler), for finding where the time goes.
python3 scripts/gpu/profile_layer.py SHAPE IMPL TOKENS [MODE]   (MODE: forward | forward+backward)"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from molae.bench.layer import _steps, build, inputs, parse_shape

shape, impl, T = parse_shape(sys.argv[1]), sys.argv[2], int(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else "forward+backward"
module = build(impl, shape, "cuda", torch.bfloat16)
sets = inputs(shape, T, 2, "cuda", torch.bfloat16, torch.Generator("cuda").manual_seed(0))
step = _steps(module, sets, mode)
for i in range(3):
    step(i % 2)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for i in range(4):
        step(i % 2)
    torch.cuda.synchronize()
print(f"== {shape.name} {impl} {T} {mode}: per step (4 steps profiled)")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=90))
