"""`molae bench ep`: expert parallelism, standard EP against MoLAE EP with latent dispatch, on K processes.

    molae bench ep --procs K [--device cuda] [--shape deepseek-v3 ...] [--tokens 4096] --out DIR

K processes on this host (one GPU each with --device cuda: NCCL; gloo on the CPU) each route their own T tokens
(uniform random top-k) through one MoE layer whose experts are split over the K ranks
(`expert_parallel.ExpertParallelExperts`: every rank allocates only its E/K experts' tensors). Implementations:

    moe           standard experts: x (n numbers) out and y (n) back per (token, rank)
    molae         every projection factorized at d = m (capped at n), G = 1: 2d out, d back
    molae-budget  the same at the uniform d that keeps --budget of the routed parameters (budget.uniform_latent)

Per shape, implementation and mode ("forward" under no_grad, "forward+backward"): the step time (median over
--repeats after warm-up, each rank timing its own steps; the slowest rank's median is the step), the forward's
phases on rank 0 (routing and the shared projections, the dispatch exchanges, the local experts, the combine
exchange, the finish: CUDA events or the host clock), the communication share of the forward, and the bytes
each rank sends to the others (dispatch, combine, and routing metadata apart), summed over ranks, beside the
formula (`expert_parallel.traffic`). Writes ep.json and ep.md (command, device, date, commit) under --out.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..command import add_command, comma_list, int_list, positive_int
from .layer import SHAPES, Shape, _sync, parse_shape, today

IMPLS = ("moe", "molae", "molae-budget")
MODES = ("forward", "forward+backward")
PHASES = ("route", "dispatch", "experts", "combine", "finish")


class PhaseClock:
    """Marks between a forward's phases (ExpertParallelExperts calls mark(name) after each); CUDA events on a
    GPU, the host clock elsewhere. `spans()` gives {phase: ms} of the last forward."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def start(self):
        self.marks = [self._now("start")]

    def mark(self, name: str):
        self.marks.append(self._now(name))

    def _now(self, name):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return name, e
        return name, time.perf_counter()

    def spans(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {b[0]: a[1].elapsed_time(b[1]) for a, b in zip(self.marks, self.marks[1:])}
        return {b[0]: (b[1] - a[1]) * 1e3 for a, b in zip(self.marks, self.marks[1:])}


def latent_of(impl: str, shape: Shape, budget: float) -> dict[str, int] | None:
    from ..budget import uniform_latent

    if impl == "moe":
        return None
    d = shape.latent if impl == "molae" else uniform_latent(budget, shape.n_experts, shape.inter, shape.dim)
    return dict(gate=d, up=d, down=d)


def _median_ms(step, device, warmup: int, repeats: int) -> float:
    """layer.median_ms with a fixed number of repeats: every rank must run the same steps (they are collective)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):  # the same count on every rank: each step is collective
        t = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_rank(rank: int, world: int, init: str, a: dict) -> list[dict] | None:
    """One process of the benchmark; rank 0 returns the rows."""
    import torch.distributed as dist

    from ..expert_parallel import ExpertParallelExperts

    cuda = a["device"] == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world)
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    try:
        for shape in map(parse_shape, a["shapes"]):
            for T in a["tokens"]:
                gen = torch.Generator().manual_seed(1000 * rank + T)
                x = torch.randn(T, shape.dim, generator=gen).to(device, dtype)
                idx = torch.stack([torch.randperm(shape.n_experts, generator=gen)[:shape.top_k] for _ in range(T)])
                w = torch.rand(T, shape.top_k, generator=gen).softmax(-1).to(device)
                idx = idx.to(device)
                for impl in a["impls"]:
                    latent = latent_of(impl, shape, a["budget"])
                    torch.manual_seed(rank)
                    ep = ExpertParallelExperts(shape.dim, shape.inter, shape.n_experts, latent, 1, device=device,
                                               dtype=dtype)
                    rows += _measure(ep, shape, impl, T, x, idx, w, device, a, world)
                    del ep
                    if cuda:
                        torch.cuda.empty_cache()
        return rows if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _measure(ep, shape, impl, T, x, idx, w, device, a, world) -> list[dict]:
    import torch.distributed as dist

    from ..expert_parallel import traffic

    size = x.element_size()
    out = []
    for mode in a["modes"]:
        if mode == "forward":
            def step():
                with torch.no_grad():
                    ep(x, idx, w)
        else:
            xg = x.detach().clone().requires_grad_()

            def step():
                ep(xg, idx, w).float().square().mean().backward()
        ms = _median_ms(step, device, a["warmup"], a["repeats"])
        slowest = torch.tensor([ms], device=device, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        row = dict(shape=shape.name, impl=impl, tokens_per_rank=T, mode=mode, ranks=world, ms=float(slowest),
                   rank0_ms=ms, latent=ep.latent.get("up"))
        if mode == "forward":
            clock = PhaseClock(device)
            ep.clock = clock
            with torch.no_grad():
                clock.start()
                ep(x, idx, w)
            ep.clock = None
            spans = clock.spans()
            row["phases_ms"] = spans
            step_ms = sum(spans.values())
            row["comm_share"] = (spans["dispatch"] + spans["combine"]) / step_ms if step_ms else None
            sent = torch.tensor([ep.last_traffic[k] for k in ("dispatch", "combine", "metadata")], device=device,
                                dtype=torch.float64)
            want = traffic(ep.expert_slot_of(idx).cpu(), shape.n_experts, ep.groups, world, ep.rank, ep.widths())
            ok = torch.tensor([float(all(ep.last_traffic[k] == v for k, v in want.items()))], device=device)
            dist.all_reduce(sent)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            row.update(dispatch_bytes=int(sent[0]) * size, combine_bytes=int(sent[1]) * size,
                       metadata_bytes=int(sent[2]) * 8, bytes_match_formula=bool(ok.item()))
        out.append(row)
    return out


def _spawned(rank, world, init, a, queue):
    rows = run_rank(rank, world, init, a)
    if rank == 0:
        queue.put(rows)


def bench_ep(procs: int, shapes: list[str], tokens: list[int], impls: list[str], modes: list[str], device: str,
             budget: float = 0.5, warmup: int = 2, repeats: int = 10) -> list[dict]:
    import torch.multiprocessing as mp

    a = dict(shapes=shapes, tokens=tokens, impls=impls, modes=modes, device=device, budget=budget, warmup=warmup,
             repeats=repeats)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        ps = [ctx.Process(target=_spawned, args=(r, procs, f"file://{tmp}/rendezvous", a, queue)) for r in range(procs)]
        for p in ps:
            p.start()
        rows = None
        while rows is None:
            try:
                rows = queue.get(timeout=5)
            except Exception:  # queue.Empty: a dead process means no rows will come
                if any(p.exitcode not in (None, 0) for p in ps):
                    for p in ps:
                        p.kill()
                    raise RuntimeError("a benchmark process failed (its traceback is above)") from None
        for p in ps:
            p.join()
    for r in rows:  # the ratio each MoLAE row's traffic and time have to the standard EP's
        base = next((b for b in rows if b["impl"] == "moe" and all(b[k] == r[k] for k in ("shape", "tokens_per_rank",
                                                                                             "mode"))), None)
        if base is not None and r is not base:
            r["speedup_vs_moe"] = base["ms"] / r["ms"]
            if "dispatch_bytes" in r:
                r["bytes_vs_moe"] = (r["dispatch_bytes"] + r["combine_bytes"]) / (base["dispatch_bytes"] +
                                                                                   base["combine_bytes"])
    return rows


def report(result: dict) -> str:
    lines = ["# Expert parallelism: standard EP against MoLAE EP (latent dispatch)", "",
             f"- command: `{result['command']}`", f"- device: {result['device']}; {result['ranks']} ranks; "
             f"date {result['date']}; commit `{result['commit']}`",
             "- bytes: sent to other ranks, summed over ranks (metadata: each pair's expert ids and weights, apart); "
             "step: the slowest rank's median; phases and communication share: rank 0's forward", "",
             "| shape | tokens/rank | impl | d | mode | step ms | vs moe | dispatch MB | combine MB | bytes vs moe | "
             "comm share | bytes = formula |", "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]

    def cell(r, key, fmt):
        return fmt.format(r[key]) if r.get(key) is not None else ""

    for r in result["rows"]:
        formula = "" if "bytes_match_formula" not in r else ("yes" if r["bytes_match_formula"] else "NO")
        mb = [cell(r, k, "{:.2f}") if k not in r else f"{r[k] / 1e6:.2f}" for k in ("dispatch_bytes", "combine_bytes")]
        lines.append(f"| {r['shape']} | {r['tokens_per_rank']} | {r['impl']} | {r['latent'] or ''} | {r['mode']} | "
                     f"{r['ms']:.3f} | {cell(r, 'speedup_vs_moe', '{:.2f}x')} | {mb[0]} | {mb[1]} | "
                     f"{cell(r, 'bytes_vs_moe', '{:.2f}')} | {cell(r, 'comm_share', '{:.0%}')} | {formula} |")
    return "\n".join(lines) + "\n"


def cmd_bench_ep(args):
    from ..checkpoint import write_json_atomically, write_text_atomically

    if args.device == "cuda" and torch.cuda.device_count() < args.procs:
        raise ValueError(f"--procs {args.procs} with --device cuda needs {args.procs} GPUs, this machine has "
                         f"{torch.cuda.device_count()}: lower --procs or pass --device cpu")
    shapes = args.shape or ["deepseek-v3", "qwen3-30b-a3b"]
    for s in shapes:
        parse_shape(s)
    rows = bench_ep(args.procs, shapes, args.tokens, list(args.impls), list(args.modes), args.device, args.budget,
                    args.warmup, args.repeats)
    from .convert import device_name

    device = device_name(args.device) + (", NCCL" if args.device == "cuda" else ", gloo")
    result = dict(command="molae " + " ".join(sys.argv[1:]), device=device, ranks=args.procs, date=today(), commit=args.commit, torch=torch.__version__,
                  rows=rows)
    out = Path(args.out)
    write_json_atomically(out / "ep.json", result)
    write_text_atomically(out / "ep.md", report(result))
    print(report(result), end="")
    print(f"wrote ep.json and ep.md under {out}")


def add_commands(bench):
    """This benchmark's `molae bench` subcommands."""
    be = add_command(bench, "ep", cmd_bench_ep, outputs={"out": "writable"}, devices=("device",),
                     help="expert parallelism on K local processes: standard EP against MoLAE's latent dispatch",
                     description="Split one MoE layer's experts over K processes (one GPU each, NCCL; or gloo on "
                                 "the CPU) and time standard EP against MoLAE EP, forward and forward+backward, "
                                 "with the forward's phases and the bytes each rank sends. Writes ep.json, ep.md.")
    be.add_argument("--procs", type=positive_int, required=True, help="EP ranks (processes) on this host")
    be.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (NCCL) or cpu (gloo)")
    be.add_argument("--shape", action="append", default=None,
                    help=f"a preset ({', '.join(SHAPES)}) or n,m,E,k; repeatable (default deepseek-v3, qwen3-30b-a3b)")
    be.add_argument("--tokens", type=int_list, default=[4096], help="tokens per rank, comma list (default 4096)")
    be.add_argument("--impls", type=comma_list(IMPLS), default=IMPLS, help="implementations (default all three)")
    be.add_argument("--modes", type=comma_list(MODES), default=MODES, help="forward, forward+backward (default both)")
    be.add_argument("--budget", type=float, default=0.5, help="the fraction molae-budget keeps (default 0.5)")
    be.add_argument("--warmup", type=positive_int, default=2, help="warm-up steps (default 2)")
    be.add_argument("--repeats", type=positive_int, default=10, help="timed steps per measurement (default 10)")
    be.add_argument("--out", type=Path, required=True, help="directory for ep.json and ep.md")
    be.add_argument("--commit", default="unknown", help="the git commit being measured, recorded in the results")
