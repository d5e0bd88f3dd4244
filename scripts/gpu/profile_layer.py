"""Kernel-time breakdown of one experts step (torch.profiler), for finding where the time goes.
python3 scripts/gpu/profile_layer.py SHAPE IMPL TOKENS [MODE]   (MODE: forward | forward+backward)
Prints the wall time per step (20 steps, synchronised at the end), the device time per step (the profiled kernels'
total) and the host time per step (the profiled CPU total): a step whose wall time is near its host time and well
above its device time is bound by launching, not by the GPU."""
import sys
import time

import torch
from torch.autograd import DeviceType
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
t0 = time.perf_counter()
for i in range(20):
    step(i % 2)
torch.cuda.synchronize()
wall_ms = (time.perf_counter() - t0) / 20 * 1e3
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for i in range(4):
        step(i % 2)
    torch.cuda.synchronize()
events = prof.key_averages()
# the kernels' own time: an op's self device time repeats its kernels' (summing every event counted it twice,
# commit 1f6f682's cliff-profile.txt), so only device-side events, as the table's "Self CUDA time total"
device_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 4 / 1e3
host_ms = sum(e.self_cpu_time_total for e in events) / 4 / 1e3
print(f"== {shape.name} {impl} {T} {mode}: wall {wall_ms:.3f} ms/step, device {device_ms:.3f} ms/step, "
      f"host (profiled) {host_ms:.3f} ms/step; kernels per step (4 steps profiled):")
print(events.table(sort_by="device_time_total", row_limit=18, max_name_column_width=90))
