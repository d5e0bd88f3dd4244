"""`molae bench layer`: MoLAE experts against standard MoE kernels, timed side by side in one run.

Every implementation is an `experts` module with transformers' call signature
(hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D], so all run on the same
inputs: transformers' own experts (Qwen3MoeExperts, experts_implementation "eager" and
"grouped_mm"), our standard `Experts` fast path ("moe"), and MoLAE `Experts` with every projection
factorized at d = m (capped at n), G = 1 and G = 8 (where 8 does not divide E: its largest divisor
below 8).

Method (the device library's METHOD.md): the bf16 matmul peak and the device copy bandwidth are
measured in the same run; each figure is the median of repeats after warm-up, timed with CUDA
events; inputs rotate among several sets so no step reads the previous one's from L2. Routing is
uniform random (K distinct experts per token) within the model's own routing-group limit (DeepSeek-V3: each
token in 4 of its 8 groups, so MoLAE's G = 8, whose groups are the routing groups, touches at most 4;
results/speed.md's runs predate the limit: there every token could enter any group), weights float32 as
routers give them. "forward" is timed under no_grad (inference); "forward+backward" includes the
gradients of the input, the routing weights and every weight. Decode sizes (1-64 tokens) are forward
only, replayed from CUDA graphs where the implementation captures (no host sync), each after an L2 flush
outside its timing (a decode step's few MB of weights would otherwise stay in L2 between replays), with
the weight bytes read per token: the touched experts' matrices and the touched groups' shared
projections, the least any implementation must read. Where our `Experts` take the decode kernels (`path`
"decode"), the same module forced onto the grouped-GEMM path is timed beside it as "IMPL/grouped", and
where it takes the grouped path, forced onto the decode kernels as "IMPL/decode" (the crossover).
On CUDA, "forward (CUDA graph)" and "forward+backward (CUDA graph)" (up to GRAPHED_BACKWARD_MAX_TOKENS) time the
same steps replayed from CUDA graphs (every implementation but hf-eager, whose loop syncs with the host): beside
the eager ones they say how much of a step is the host launching kernels (below a few thousand tokens these steps
are launch-bound) and how much the GPU's work.
Useful FLOPs are the layer's own arithmetic (standard 6·n·m·T·k; MoLAE 6·n·d per (token, group) pair
plus 6·m·d per routed slot); forward+backward counts three times the forward.

Shape legend as in layers.py: T tokens, K top-k, S = T*K slots, D = n, F = m, L = d, E experts, G groups.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from ..kernels import triton_ok
from ..layers import KINDS, PRESETS, Experts, Routing, group_limited, grouped_linear, pick_backend
from ..command import (add_command, comma_list, existing_path, int_list, positive_float, positive_int,
                       progress_bar)

SHAPES = ("qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3")
IMPLS = ("hf-eager", "hf-grouped_mm", "moe", "molae-g1", "molae-g8")
STANDARD = ("hf-eager", "hf-grouped_mm", "moe")
TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
MODES = ("forward", "forward+backward")
# the steps replayed from CUDA graphs: the GPU's time without the host's launches (which, eager, pace the smaller
# steps), each mode -> the step it replays
GRAPHED = "forward (CUDA graph)"
GRAPHED_BACKWARD = "forward+backward (CUDA graph)"
REPLAYED = {GRAPHED: "forward", GRAPHED_BACKWARD: "forward+backward"}
GRAPHED_BACKWARD_MAX_TOKENS = 4096  # past this, eager steps are not launch-bound (results/notes/speed.md)


@dataclass
class Shape:
    name: str
    dim: int  # D = n
    inter: int  # F = m
    n_experts: int  # E
    top_k: int  # K
    n_group: int = 1  # routing groups (DeepSeek-V3: 8): each token's experts from its topk_group best
    topk_group: int = 1

    @property
    def latent(self) -> int:  # the paper's d = m, capped at n (Mixtral: m > n)
        return min(self.inter, self.dim)


def parse_shape(text: str) -> Shape:
    if text in PRESETS:
        c = PRESETS[text]
        return Shape(text, c.dim, c.inter, c.n_experts, c.top_k, c.n_group, c.topk_group)
    try:
        D, F_, E, K = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"shape {text!r} is not known: give a preset ({', '.join(PRESETS)}) or n,m,E,k") from None
    if min(D, F_, E, K) < 1 or K > E:
        raise ValueError(f"shape {text!r} is out of range: n, m, E, k positive and k <= E")
    return Shape(text, D, F_, E, K)


def groups_of(impl: str, n_experts: int) -> int:
    """G of a MoLAE implementation "molae-gN": N, or E's largest divisor below N."""
    if not impl.startswith("molae"):
        return 1
    want = int(impl.split("-g")[1])
    return max(g for g in range(1, want + 1) if n_experts % g == 0)


@contextlib.contextmanager
def _default(device, dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build(impl: str, shape: Shape, device, dtype) -> nn.Module:
    """One experts module of the given implementation, random normal weights, made on the device."""
    D, F_, E, K = shape.dim, shape.inter, shape.n_experts, shape.top_k
    with _default(device, dtype):
        if impl.startswith("hf-"):
            from transformers import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

            cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F_, num_experts=E, num_experts_per_tok=K,
                                 experts_implementation=impl[3:])
            module = Qwen3MoeExperts(cfg)
            nn.init.normal_(module.gate_up_proj, std=D**-0.5)
            nn.init.normal_(module.down_proj, std=F_**-0.5)
            return module
        if impl == "moe":
            return Experts(D, F_, E)
        if impl.startswith("molae-g"):
            return Experts(D, F_, E, dict.fromkeys(KINDS, shape.latent), groups_of(impl, E))
    raise ValueError(f"implementation {impl!r} is not known: allowed {', '.join(IMPLS)}")


def inputs(shape: Shape, T: int, sets: int, device, dtype, gen: torch.Generator) -> list[dict]:
    """`sets` independent (x, top-k index, weights, output gradient) sets of T tokens."""
    out = []
    for _ in range(sets):
        scores = group_limited(torch.rand(T, shape.n_experts, generator=gen, device=device), shape.n_group,
                               shape.topk_group)  # the model's own limit: DeepSeek-V3 routes within 4 of 8 groups
        out.append(dict(
            x=torch.randn(T, shape.dim, generator=gen, device=device, dtype=dtype),
            idx=scores.topk(shape.top_k, dim=-1).indices,  # K distinct experts per token, uniform
            w=torch.rand(T, shape.top_k, generator=gen, device=device).softmax(-1),
            gy=torch.randn(T, shape.dim, generator=gen, device=device, dtype=dtype),
        ))
    return out


def useful_flops(impl: str, shape: Shape, idx_TK: torch.Tensor) -> int:
    """Forward FLOPs of the layer's own arithmetic for this routing."""
    T, K = idx_TK.shape
    S = T * K
    if impl in STANDARD:
        return 6 * shape.dim * shape.inter * S
    G = groups_of(impl, shape.n_experts)
    pairs = T if G == 1 else _touched(idx_TK // (shape.n_experts // G), per_token=True)
    return 6 * shape.latent * (shape.dim * pairs + shape.inter * S)


def _touched(ids_TK: torch.Tensor, per_token: bool = False) -> int:
    """Distinct ids in the batch, or (per_token) distinct (token, id) pairs."""
    if per_token:
        ids_TK = ids_TK + torch.arange(len(ids_TK), device=ids_TK.device)[:, None] * (int(ids_TK.max()) + 1)
    return int(torch.unique(ids_TK).numel())


def weight_bytes(module: nn.Module, shape: Shape, impl: str, idx_TK: torch.Tensor) -> int:
    """Bytes of weights a step must read: the touched experts' matrices, the touched groups' B's."""
    G = groups_of(impl, shape.n_experts)
    experts, groups = _touched(idx_TK), _touched(idx_TK // (shape.n_experts // G))
    total = 0
    for name, p in module.named_parameters():
        per = p[0].numel() * p.element_size()
        total += per * (groups if name.endswith("_B") else experts)
    return total


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(step, n_sets: int, device, warmup: int = 2, min_repeats: int = 5, max_repeats: int = 50,
              target_s: float = 0.3, before=None) -> dict:
    """Median milliseconds of step(i) over repeats (enough to fill about target_s), rotating i over the
    input sets; CUDA events on a GPU, a host clock after each step elsewhere. Also the peak memory
    allocated while the repeats ran (CUDA): all of it, and the part above what was allocated before.
    before(): run ahead of every step, outside its timing (an L2 flush)."""
    cuda = torch.device(device).type == "cuda"
    before = before or (lambda: None)
    for i in range(warmup):
        before()
        t0 = time.perf_counter()
        step(i % n_sets)
        _sync(device)
    est = time.perf_counter() - t0
    n = max(min_repeats if est < 1 else 3, min(max_repeats, int(target_s / max(est, 1e-6))))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i, (a, b) in enumerate(events):
            before()
            a.record()
            step(i % n_sets)
            b.record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in events]
        peak = torch.cuda.max_memory_allocated()
        return dict(ms=statistics.median(times), fastest_ms=min(times), repeats=n, peak_gb=peak / 1e9,
                    step_gb=(peak - base) / 1e9)
    times = []
    for i in range(n):
        before()
        t = time.perf_counter()
        step(i % n_sets)
        times.append((time.perf_counter() - t) * 1e3)
    return dict(ms=statistics.median(times), fastest_ms=min(times), repeats=n, peak_gb=None, step_gb=None)


def l2_flush(device):
    """A function that evicts the GPU's L2 (writes a buffer of twice its size), or None off CUDA. Decode
    steps read a few MB of weights; replayed back to back they would find them in L2 (Qwen3's shared B's
    fit), which a model's layer, run after all the others, does not."""
    if torch.device(device).type != "cuda":
        return None
    scratch = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.uint8,
                          device=device)
    return lambda: scratch.zero_()


def graphed(step, n_sets: int):
    """step(i) for each input set captured once in a CUDA graph; returns a step that replays them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as graph capture requires
        for i in range(n_sets):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    graphs, pool = [], None
    for i in range(n_sets):  # one memory pool for all: they replay in the order they were captured, one at a time
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            step(i)
        graphs.append(g)
        pool = pool or g.pool()
    return lambda i: graphs[i].replay()


def matmul_rate(device, dtype, size: int, **repeats) -> dict:
    """FLOP/s of a size^3 matmul on random inputs (two rotated sets): the median and the fastest repeat.
    The one measurement behind the benchmarks' matmul ceiling and the trainer's MFU denominator."""
    gen = torch.Generator(device).manual_seed(0)
    a = [torch.randn(size, size, generator=gen, device=device, dtype=dtype) for _ in range(2)]
    b = [torch.randn(size, size, generator=gen, device=device, dtype=dtype) for _ in range(2)]
    t = median_ms(lambda i: a[i] @ b[i], 2, device, **repeats)
    return dict(median=2 * size**3 / t["ms"] * 1e3, fastest=2 * size**3 / t["fastest_ms"] * 1e3)


def measure_ceilings(device, dtype, size: int) -> dict:
    """The two ceilings, measured: a size^3 matmul's rate and a device copy's bandwidth."""
    gen = torch.Generator(device).manual_seed(1)
    warm = dict(warmup=200, min_repeats=100, max_repeats=100)  # long enough for clocks to settle
    ms = 2 * size**3 / matmul_rate(device, dtype, size, **warm)["median"] * 1e3
    n = 8 * size * size  # 1 GiB at size 8192 in bf16
    src = [torch.randn(n, generator=gen, device=device, dtype=dtype) for _ in range(2)]
    dst = torch.empty_like(src[0])
    copy_ms = median_ms(lambda i: dst.copy_(src[i]), 2, device, **warm)["ms"]
    return dict(matmul_tflops=2 * size**3 / ms / 1e9, matmul_size=size,
                copy_tb_s=2 * n * src[0].element_size() / copy_ms / 1e9, copy_bytes=n * src[0].element_size())


def path_taken(module: nn.Module, s: dict, mode: str) -> str | None:
    """Which forward path an `Experts` module takes on these inputs (its impl "fast" chooses), else None."""
    if not isinstance(module, Experts):
        return None
    if module.impl != "fast":
        return module.impl
    with torch.set_grad_enabled(mode == "forward+backward"):
        x = s["x"].detach().requires_grad_(mode == "forward+backward")
        return "decode" if module._decode_fits(x, s["idx"]) else "grouped"


def _steps(module: nn.Module, sets: list[dict], mode: str):
    params = list(module.parameters())

    def forward(i):
        s = sets[i]
        with torch.no_grad():
            return module(s["x"], s["idx"], s["w"])

    def forward_backward(i):
        s = sets[i]
        for p in params:
            p.grad = None
        x, w = s["x"].detach().requires_grad_(), s["w"].detach().requires_grad_()
        module(x, s["idx"], w).backward(s["gy"])

    return forward if mode != "forward+backward" else forward_backward


def time_impl(module, impl: str, shape: Shape, T: int, mode: str, sets: list[dict], device, ceilings) -> dict:
    base = REPLAYED.get(mode, mode)
    step = _steps(module, sets, base)
    graph = (mode == "decode" or mode in REPLAYED) and capturable(impl, device)
    if graph:
        step = graphed(step, len(sets))
    t = median_ms(step, len(sets), device, before=l2_flush(device) if mode == "decode" else None)
    for p in module.parameters():  # gradients left by the last step must not count in the next peak
        p.grad = None
    ms = t["ms"]
    flops = statistics.mean(useful_flops(impl, shape, s["idx"]) for s in sets) * (3 if base == "forward+backward" else 1)
    row = dict(shape=shape.name, impl=impl, groups=groups_of(impl, shape.n_experts), mode=mode, tokens=T, **t,
               flops=flops, tflops=flops / ms / 1e9, peak_fraction=flops / ms / 1e9 / ceilings["matmul_tflops"],
               cuda_graph=graph, path=path_taken(module, sets[0], base))
    if mode == "decode":
        wb = statistics.mean(weight_bytes(module, shape, impl, s["idx"]) for s in sets)
        row.update(l2_flushed=torch.device(device).type == "cuda", weight_bytes=wb, weight_bytes_per_token=wb / T,
                   bandwidth_tb_s=wb / ms / 1e9,
                   bandwidth_fraction=wb / ms / 1e9 / ceilings["copy_tb_s"])
    return row


def time_molae_phases(module: Experts, shape: Shape, T: int, sets: list[dict], device, ceilings) -> list[dict]:
    """MoLAE (G = 1) parts timed alone at T tokens: the grouped phase (the three per-expert A GEMMs over
    sorted slots), forward and forward+backward; and the gate/up shared projections as two GEMMs
    against one GEMM on [B_gate; B_up] concatenated per call (the fusion the stored layout allows)."""
    L, F_, S = shape.latent, shape.inter, T * shape.top_k
    gen = torch.Generator(device).manual_seed(T)
    dtype = module.gate_A.dtype
    data = []
    for s in sets:
        r = Routing(s["idx"], shape.n_experts, 1)
        z = [torch.randn(S, L, generator=gen, device=device, dtype=dtype) for _ in range(2)]
        h = torch.randn(S, F_, generator=gen, device=device, dtype=dtype)
        data.append((r, z, h))
    A = [module.gate_A, module.up_A, module.down_A]

    def grouped(i, backend, backward=False):
        r, (zg, zu), h = data[i]
        ins = [t.detach().requires_grad_(backward) for t in (zg, zu, h)]
        outs = [grouped_linear(x, a, r.offs_E, backend) for x, a in zip(ins, A)]
        if backward:
            torch.autograd.backward(outs, [o.detach() for o in outs])  # any gradient of the right shape
            for p in A:
                p.grad = None

    B_gate, B_up = module.gate_B[0].detach(), module.up_B[0].detach()
    backend = pick_backend(data[0][2], A[2])  # the layers' kernel
    phases = [
        (f"grouped forward ({backend})", lambda i: grouped(i, backend), 6 * S * F_ * L),
        (f"grouped forward+backward ({backend})", lambda i: grouped(i, backend, True), 18 * S * F_ * L),
        ("B gate, up: two GEMMs", lambda i: (sets[i]["x"] @ B_gate.T, sets[i]["x"] @ B_up.T), 4 * T * shape.dim * L),
        ("B gate, up: one GEMM, concatenated per call",
         lambda i: sets[i]["x"] @ torch.cat([B_gate, B_up]).T, 4 * T * shape.dim * L)]
    rows = []
    for phase, step, flops in phases:
        with torch.no_grad() if "backward" not in phase else contextlib.nullcontext():
            t = median_ms(step, len(sets), device)
        rows.append(dict(shape=shape.name, impl="molae-g1", mode=phase, tokens=T, ms=t["ms"], repeats=t["repeats"],
                         flops=flops, tflops=flops / t["ms"] / 1e9,
                         peak_fraction=flops / t["ms"] / 1e9 / ceilings["matmul_tflops"]))
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Each row's speed-up over the fastest standard implementation at its shape, tokens and mode."""
    best = {}
    for r in rows:
        if r["impl"].split("/")[0] in STANDARD:  # "moe/grouped": our standard layer on its grouped path
            key = (r["shape"], r["tokens"], r["mode"])
            if key not in best or r["ms"] < best[key][0]:
                best[key] = (r["ms"], r["impl"])
    for r in rows:
        b = best.get((r["shape"], r["tokens"], r["mode"]))
        if b and r["impl"].split("/")[0] in IMPLS:
            r["best_standard"], r["speedup"] = b[1], b[0] / r["ms"]


def capturable(impl: str, device) -> bool:
    """Whether an implementation's step can be captured in a CUDA graph: on CUDA, all but hf-eager (its loop
    syncs with the host)."""
    return torch.device(device).type == "cuda" and not impl.startswith("hf-eager")


def modes_for(impl: str, device, tokens: int | None = None) -> tuple[str, ...]:
    """The modes timed at a --tokens size: each also replayed from CUDA graphs where it can be captured, the
    forward+backward only up to GRAPHED_BACKWARD_MAX_TOKENS (None: every mode at some size)."""
    graphed = [m for m in REPLAYED if m != GRAPHED_BACKWARD or tokens is None or tokens <= GRAPHED_BACKWARD_MAX_TOKENS]
    return MODES + (tuple(graphed) if capturable(impl, device) else ())


def bench_layer(shapes: list[Shape], impls: list[str], tokens: list[int], decode_tokens: list[int], device: str,
                dtype: torch.dtype, sets: int, peak_size: int, max_step_s: float = 2.0, seed: int = 0) -> dict:
    """Every implementation at every shape, token count and mode. An (implementation, mode) whose step
    took over max_step_s at some token count is not timed at larger ones (listed under "skipped")."""
    ceilings = measure_ceilings(device, dtype, peak_size)
    rows, skipped = [], []
    gen = torch.Generator(device).manual_seed(seed)
    work = [(s, i) for s in shapes for i in impls]
    for shape, impl in progress_bar(work, desc="bench layer", unit="impl"):
        module = build(impl, shape, device, dtype)
        for T in tokens:
            batch = inputs(shape, T, sets, device, dtype, gen)
            for mode in modes_for(impl, device, T):
                slow = [r for r in rows if (r["shape"], r["impl"], r["mode"]) == (shape.name, impl, mode)
                        and r["ms"] > 1e3 * max_step_s]
                if slow:
                    skipped.append(dict(shape=shape.name, impl=impl, mode=mode, tokens=T, reason=(
                        f"a step took {slow[0]['ms'] / 1e3:.1f} s at {slow[0]['tokens']} tokens, over the "
                        f"{max_step_s:g} s allowed")))
                    continue
                try:
                    rows.append(time_impl(module, impl, shape, T, mode, batch, device, ceilings))
                except torch.cuda.OutOfMemoryError:
                    skipped.append(dict(shape=shape.name, impl=impl, mode=mode, tokens=T, reason="out of GPU memory"))
                    torch.cuda.empty_cache()
                except RuntimeError as e:  # a step that cannot be captured (a host sync in its backward, say)
                    if mode not in REPLAYED:
                        raise
                    skipped.append(dict(shape=shape.name, impl=impl, mode=mode, tokens=T,
                                        reason=f"not capturable: {str(e).splitlines()[0][:200]}"))
            if impl == "molae-g1":
                rows += time_molae_phases(module, shape, T, batch, device, ceilings)
            del batch
        for T in decode_tokens:
            batch = inputs(shape, T, sets, device, dtype, gen)
            rows.append(time_impl(module, impl, shape, T, "decode", batch, device, ceilings))
            if isinstance(module, Experts) and triton_ok(batch[0]["x"]):  # the path "fast" did not take, beside
                other = "grouped" if rows[-1]["path"] == "decode" else "decode"  # it: where the crossover lies
                module.impl = other
                rows.append(time_impl(module, impl, shape, T, "decode", batch, device, ceilings) | dict(
                    impl=f"{impl}/{other}"))
                module.impl = "fast"
        del module
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows)
    return dict(ceilings=ceilings, shapes=[asdict(s) | {"latent": s.latent} for s in shapes], impls=impls,
                dtype=str(dtype).removeprefix("torch."), sets=sets, max_step_s=max_step_s, rows=rows, skipped=skipped)


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


# ----------------------------------------------------------------------------- report


def write_results(result: dict, out: Path) -> None:
    """speed.json (every row) and speed.md (the tables and the targets' verdicts), both atomically."""
    from ..checkpoint import write_json_atomically, write_text_atomically

    out = Path(out)
    write_json_atomically(out / "speed.json", result)
    write_text_atomically(out / "speed.md", report(result))


def _row(rows, **key):
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)


def report(result: dict) -> str:
    c, rows = result["ceilings"], result["rows"]
    shapes = [s["name"] for s in result["shapes"]]
    impls = result["impls"]
    modes = [m for m in (*MODES, *REPLAYED) if any(r["mode"] == m for r in rows)]
    tokens = sorted({r["tokens"] for r in rows if r["mode"] in modes})
    decode = sorted({r["tokens"] for r in rows if r["mode"] == "decode"})
    molae = [i for i in impls if i.startswith("molae")]
    lines = ["# MoLAE layer speed against standard MoE kernels ([6])", "",
             f"- command: `{result['command']}`",
             f"- device: {result['device']}; date {result['date']}; commit `{result['commit']}`; "
             f"torch {result['torch']}, transformers {result['transformers']}; {result['dtype']}",
             f"- measured in the same run: {result['dtype']} matmul {c['matmul_tflops']:.0f} TFLOP/s "
             f"({c['matmul_size']}³), device copy {c['copy_tb_s']:.2f} TB/s (bytes read + written)",
             "- shapes (n, m, E, k; MoLAE d = m capped at n, all of gate/up/down factorized): " + "; ".join(
                 f"{s['name']} ({s['dim']}, {s['inter']}, {s['n_experts']}, {s['top_k']}; d {s['latent']}; "
                 f"G {', '.join(str(groups_of(i, s['n_experts'])) for i in molae)})" for s in result["shapes"]),
             "- method: medians of repeats after warm-up, CUDA events, inputs rotated over "
             f"{result['sets']} sets; uniform random top-k routing; forward under no_grad, forward+backward with "
             "gradients of input, routing weights and all weights; useful FLOPs = the layer's own arithmetic "
             "(docstring of molae/bench/layer.py); speed-up = fastest standard implementation's time / this time; peak GB = "
             "all memory allocated at the step's peak (weights, the rotated input sets, activations, gradients).", ""]
    lines += _targets(rows, shapes, tokens, modes) + [""]

    def cell(mode, fmt):  # a table cell from the row of (shape, tokens, implementation or phase), "" if none
        def get(s, T, col):
            r = _row(rows, shape=s, mode=mode or col, tokens=T, **({"impl": col} if mode else {}))
            return "" if r is None else fmt(r, col)
        return get

    timed = lambda r, i: f"{r['ms']:.3f}" + (f" ({r['speedup']:.2f}x)" if i in molae and "speedup" in r else "")  # noqa: E731
    rate = lambda r, i: f"{r['tflops']:.0f} ({100 * r['peak_fraction']:.0f}%), " + (  # noqa: E731
        "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.1f} GB")
    for mode in modes:
        lines += _table(f"## {mode}: milliseconds (speed-up over the fastest standard)", shapes, tokens, impls,
                        cell(mode, timed))
        lines += _table(f"### {mode}: useful TFLOP/s (fraction of the measured matmul peak) and peak GB allocated",
                        shapes, tokens, impls, cell(mode, rate))
    if result.get("skipped"):
        by = {}
        for x in result["skipped"]:
            by.setdefault((x["shape"], x["impl"], x["mode"], x["reason"]), []).append(x["tokens"])
        lines += ["Not timed (blank cells): " + "; ".join(f"{i} {m} on {s} at {', '.join(map(str, T))} tokens ({why})"
                                                          for (s, i, m, why), T in by.items()) + ".", ""]
    phases = list(dict.fromkeys(r["mode"] for r in rows if r["mode"] not in (*MODES, *REPLAYED, "decode")))
    if phases:
        lines += _table("## MoLAE (G = 1) phases alone: milliseconds, useful TFLOP/s (fraction of peak)", shapes,
                        tokens, phases, cell(None, lambda r, _: f"{r['ms']:.3f}, {r['tflops']:.0f} "
                                                                f"({100 * r['peak_fraction']:.0f}%)"))
    if decode:
        timed = {r["impl"] for r in rows}
        forced = [f"{i}/{p}" for i in impls for p in ("grouped", "decode") if f"{i}/{p}" in timed]
        lines += _table("## decode: milliseconds; weight MB read per token; bandwidth (fraction of measured copy)",
                        shapes, decode, impls + forced, cell("decode", lambda r, _: (
                            f"{r['ms']:.3f}{'' if r['cuda_graph'] else ' (no graph)'}; "
                            f"{r['weight_bytes_per_token'] / 1e6:.0f} MB; {r['bandwidth_tb_s']:.2f} TB/s "
                            f"({100 * r['bandwidth_fraction']:.0f}%)")))
        lines += ["Decode steps are CUDA-graph replays except where marked (transformers' eager loop syncs "
                  "with the host, so it cannot be captured), each after an L2 flush (a write of twice the L2 size, "
                  "outside the timing) where marked in speed.json (`l2_flushed`). Our layers (moe, molae-g*) take "
                  "the decode kernels where `Experts` chooses them (`path` in speed.json); the `/grouped` and "
                  "`/decode` columns are the same modules forced onto the path `fast` did not take, timed in the "
                  "same run (where the two cross is what molae.layers.decode_fits should give).", ""]
    return "\n".join(lines) + "\n"


def _table(title, shapes, tokens, columns, cell) -> list[str]:
    """A markdown table, a row per (shape, tokens) and a column per entry of columns: cell(shape, T, column)."""
    lines = [title, "", "| shape | tokens | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for s in shapes:
        lines += [f"| {s} | {T} | " + " | ".join(cell(s, T, c) for c in columns) + " |" for T in tokens]
    return lines + [""]


def _targets(rows, shapes, tokens, modes=MODES) -> list[str]:
    """The issue's targets, measured; and where MoLAE (G = 1) is slower than the best standard, with
    the ratio of useful FLOPs (standard / MoLAE) beside it."""
    out = ["## Targets", ""]
    for mode, want in (("forward", 2.0), ("forward+backward", 1.8)):
        r = _row(rows, shape="deepseek-v3", impl="molae-g1", mode=mode, tokens=8192)
        if r is not None and "speedup" in r:
            out.append(f"- deepseek-v3, {mode}, 8192 tokens: MoLAE G=1 {r['ms']:.2f} ms vs {r['best_standard']} "
                       f"{r['ms'] * r['speedup']:.2f} ms: **{r['speedup']:.2f}x** (target >= {want}x: "
                       f"{'met' if r['speedup'] >= want else 'not met'})")
    phase = next((r["mode"] for r in rows if r["mode"].startswith("grouped forward (")), None)  # the default kernel
    for s in shapes:
        fr = [(T, _row(rows, shape=s, mode=phase, tokens=T)) for T in tokens if T >= 8192]
        fr = [(T, r) for T, r in fr if r is not None]
        if fr:
            cells = ", ".join(f"{T}: {100 * r['peak_fraction']:.0f}%" for T, r in fr)
            ok = all(r["peak_fraction"] >= 0.6 for _, r in fr)
            out.append(f"- {phase} of MoLAE on {s}, fraction of the matmul peak: {cells} "
                       f"(target >= 60%: {'met' if ok else 'not met'})")
    for s in ("qwen3-30b-a3b", "deepseek-v3"):  # decode against the copy bandwidth: >= 35% at 1-4, 50% at 8-64
        dec = sorted((r["tokens"], r) for r in rows if (r["shape"], r["impl"], r["mode"]) == (s, "molae-g1", "decode"))
        if dec:
            ok = all(r["bandwidth_fraction"] >= (0.35 if T <= 4 else 0.5) for T, r in dec)
            out.append(f"- decode on {s}, MoLAE G=1, fraction of the copy bandwidth: "
                       + ", ".join(f"{T}: {100 * r['bandwidth_fraction']:.0f}%" for T, r in dec)
                       + f" (target >= 35% at 1-4 tokens, >= 50% at 8-64: {'met' if ok else 'not met'})")
    g8 = [(r, _row(rows, shape="deepseek-v3", impl="molae-g1", mode=r["mode"], tokens=r["tokens"]))
          for r in rows if (r["shape"], r["impl"]) == ("deepseek-v3", "molae-g8")]
    if g8 := [(r, g1) for r, g1 in g8 if g1 is not None]:
        def excess(r, g1):  # time ratio over the work ratio (bytes for decode, FLOPs otherwise)
            work = "weight_bytes" if r["mode"] == "decode" else "flops"
            return (r["ms"] / g1["ms"]) / (r[work] / g1[work])
        worst = max(excess(r, g1) for r, g1 in g8)
        out.append("- deepseek-v3, G = 8 aligned with the routing groups over G = 1, time ratio / work ratio: "
                   + ", ".join(f"{r['mode']} {r['tokens']}: {excess(r, g1):.2f}" for r, g1 in g8)
                   + f" (target <= 1.15: {'met' if worst <= 1.15 else 'not met'})")
    slower = []
    for s in shapes:
        for mode in modes:
            bad = [r for T in tokens if (r := _row(rows, shape=s, impl="molae-g1", mode=mode, tokens=T))
                   and r.get("speedup", 1) < 1]
            if bad:
                std = _row(rows, shape=s, impl=bad[0]["best_standard"], mode=mode, tokens=bad[0]["tokens"])
                ratio = std["flops"] / bad[0]["flops"]
                slower.append(f"- {s}, {mode}: MoLAE G=1 slower at {', '.join(str(r['tokens']) for r in bad)} tokens "
                              f"(speed-up {min(r['speedup'] for r in bad):.2f}x to {max(r['speedup'] for r in bad):.2f}x); "
                              f"standard / MoLAE useful FLOPs {ratio:.2f}")
    out += ["", "Where MoLAE (G = 1) is slower than the fastest standard implementation:", ""] + (slower or ["- nowhere"])
    return out


# ----------------------------------------------------------------------------- `molae bench layer`

def cmd_bench_layer(args):
    import subprocess

    import torch
    import transformers

    from .convert import device_name

    shapes = [parse_shape(s) for s in args.shape or SHAPES]
    impls = list(args.impls)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip() or "unknown"
    result = bench_layer(shapes, impls, args.tokens, args.decode_tokens, args.device, getattr(torch, args.dtype),
                         args.sets, args.peak_size, args.max_step_s)
    result.update(command=args.command or "molae " + " ".join(sys.argv[1:]), device=device_name(args.device),
                  date=today(), commit=commit, torch=torch.__version__, transformers=transformers.__version__)
    write_results(result, args.out)
    print((args.out / "speed.md").read_text().split("## forward:")[0].rstrip())
    print(f"wrote speed.json and speed.md under {args.out}")


def cmd_bench_layer_report(args):

    result = json.loads(args.file.read_text())
    if args.commit:
        result["commit_recorded_on_device"], result["commit"] = result["commit"], args.commit
    write_results(result, args.out)
    print(f"wrote speed.json and speed.md under {args.out}")


def add_commands(bench):
    """This benchmark's `molae bench` subcommands."""
    bl = add_command(bench, "layer", cmd_bench_layer, outputs={"out": "writable"}, devices=("device",),
                     help="MoLAE experts against standard MoE kernels: time, FLOP/s, memory, decode",
                     description="Time transformers' experts (eager, grouped_mm), our standard MoE fast path "
                                 "and MoLAE (d = m, G = 1 and 8) side by side at real models' shapes, forward "
                                 "and forward+backward, plus decode sizes; the matmul peak and copy bandwidth "
                                 "measured in the same run. Writes speed.json and speed.md.")
    bl.add_argument("--shape", action="append", default=None,
                    help=f"a preset ({', '.join(SHAPES)}) or n,m,E,k; repeatable (default: those four presets)")
    bl.add_argument("--impls", type=comma_list(IMPLS), default=IMPLS,
                    help="implementations to time (default all five)")
    bl.add_argument("--tokens", type=int_list, default=list(TOKENS),
                    help=f"tokens per step (default {','.join(map(str, TOKENS))})")
    bl.add_argument("--decode-tokens", type=int_list, default=list(DECODE_TOKENS),
                    help=f"decode batch sizes, forward only (default {','.join(map(str, DECODE_TOKENS))}; '' for none)")
    bl.add_argument("--device", default="cuda", help="cuda (default) or cpu (for trying the harness)")
    bl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="weights and activations (default bfloat16)")
    bl.add_argument("--sets", type=positive_int, default=3, help="input sets rotated between repeats (default 3)")
    bl.add_argument("--peak-size", type=positive_int, default=8192,
                    help="size of the square matmul that measures the peak (default 8192)")
    bl.add_argument("--max-step-s", type=positive_float, default=2.0,
                    help="an implementation whose step takes longer is not timed at larger token counts (default 2)")
    bl.add_argument("--out", type=Path, default=Path("results"), help="where speed.json and speed.md go")
    bl.add_argument("--commit", default=None, help="the git commit measured (default: git rev-parse HEAD)")
    bl.add_argument("--command", default=None, help="the exact command, recorded (default: this one)")

    blr = add_command(bench, "layer-report", cmd_bench_layer_report, outputs={"out": "writable"},
                      help="speed.md again from a speed.json of molae bench layer")
    blr.add_argument("file", type=existing_path, help="speed.json")
    blr.add_argument("--out", type=Path, default=Path("results"), help="where speed.json and speed.md go")
    blr.add_argument("--commit", default=None, help="the commit the run used, where the file records a wrong one")
