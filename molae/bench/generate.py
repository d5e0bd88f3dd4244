"""`molae bench generate`: a whole model generating text, converted against its original, timed side by side.

Models (--model, repeatable): a real model's exact shapes with its first few decoder layers (`NAME:LAYERS`, NAME
from presets.REAL_MODELS; random weights built in memory on the device: several DeepSeek-V3 layers do not fit
on the GPU machine's disk; DeepSeek-V3 keeps its first_k_dense_replace dense layers in front), or a checkpoint
directory (a reference model). Implementations (--impls), all with the same weights:
  hf-eager, hf-batched_mm, hf-grouped_mm   the original through transformers' experts implementations
  moe                                     the original with our standard `Experts` (fast path) in each block
  molae                                   converted in memory (models.to_molae, data-free, gate, up and down
                                          factorized, d from --budget, G = 1): the routers are untouched
  moe/grouped, molae/grouped              the same, our experts forced onto the grouped-GEMM path (without
                                          the suffix they take the decode kernels for few tokens on CUDA)
Per implementation: prefill tokens/s (one forward over P tokens, batch 1, CUDA events, the median of repeats
after warm-up, two input sets rotated) at each --prefill; decode tokens/s at each --batch with transformers'
`generate` (greedy, static cache; without --compile eager: on CUDA, generate would otherwise compile the decode
step by itself whenever the cache is static, and compiling transformers' eager experts loop runs for many
minutes; --compile: generate's own compilation, mode reduce-overhead, i.e. CUDA graphs, and prefill through the
forward compiled the same way), as
B * (N - 1) / (the time from the first generated token to the last): a logits processor takes the time (after a
device sync) at each of generate's N steps, so that prompt processing is not counted (1f6f682 subtracted a 1-token
generation's time from an N-token one's, which on a CPU came out at or below zero); the peak memory; the
weight bytes a batch-1 decode step reads (the active parameters: every non-expert weight, top-k experts per
layer, and for MoLAE the shared latents); and whether its greedy tokens equal hf-eager's (`moe` must: the same
function). An implementation that fails (say, it cannot be compiled) is recorded with its error, not fatal.
Beside generate, --loops graph times the decode loop a lean server runs (gpt-fast's): the prompt through one
forward into a static cache, then each step, the B tokens' forward, the argmax and the token fed back, with
--compile compiled (fullgraph on CUDA) and captured once by hand into one CUDA graph over static buffers (a token
costs the host one replay, so the host runs ahead of the device: GraphDecoder), timed from the first generated
token to the last with one device sync at each end; its greedy tokens must equal generate's for the same model
(row `graph_same_tokens`). At batch 1 generate's own host loop takes about two thirds
of every token (results/notes/speed.md, the decode probe): the graph loop is what shows the device's speed.
Each measurement prints a line as it ends, and the caller gets each finished row (partial results survive).
"""

from __future__ import annotations

import inspect
import statistics
import time
from pathlib import Path

import torch

from ..budget import uniform_latent
from ..command import add_command, comma_list, error_record, fraction, int_list, positive_int
from ..evaluate import efficiency
from ..layers import KINDS
from ..models import find_experts, set_submodule, standard_experts, to_molae
from ..presets import REAL_MODELS
from .convert import device_name
from .layer import _sync, median_ms, today

LOOPS = (("decode", "decode"), ("decode_graph", "graph"))  # row key, column label: generate's, the graph loop's
IMPLS = ("hf-eager", "hf-batched_mm", "hf-grouped_mm", "moe", "molae", "moe/grouped", "molae/grouped")
STANDARD = ("hf-eager", "hf-batched_mm", "hf-grouped_mm", "moe", "moe/grouped")


def model_config(spec: str) -> tuple[str, dict | None]:
    """(name, config kwargs) of `NAME:LAYERS` (a real model's shapes), or (path, None) for a checkpoint."""
    name, _, layers = spec.partition(":")
    if name not in REAL_MODELS:
        if Path(spec).is_dir():
            return spec, None
        raise ValueError(f"--model {spec}: neither NAME:LAYERS with NAME one of {', '.join(REAL_MODELS)} nor a "
                         "checkpoint directory")
    try:
        n = int(layers or 2)
    except ValueError:
        raise ValueError(f"--model {spec}: LAYERS must be a whole number, e.g. {name}:4") from None
    c = dict(REAL_MODELS[name])
    c["num_hidden_layers"] = c.get("first_k_dense_replace", 0) + n  # n MoE layers behind the model's dense ones
    return f"{name}:{n}", c


def build(spec: str, impl: str, device, dtype, budget: float, seed: int = 0):
    """The model of `spec` for one implementation, on the device, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name, c = model_config(spec)
    experts_impl = impl[3:] if impl.startswith("hf-") else "eager"
    torch.manual_seed(seed)
    if c is None:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, experts_implementation=experts_impl)
        model.to(device)
    else:
        cfg = AutoConfig.for_model(**c, experts_implementation=experts_impl)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    ours, _, path = impl.partition("/")
    if ours == "moe":
        for n, m in find_experts(model):
            set_submodule(model, n, standard_experts(m))
    elif ours == "molae":
        _, m = find_experts(model)[0]
        E, F_, D = m.gate_up_proj.shape[0], m.gate_up_proj.shape[1] // 2, m.gate_up_proj.shape[2]
        # factorized in float32 (the default), the result in the model's dtype
        to_molae(model, latent_dim=uniform_latent(budget, E, F_, D), projections=KINDS)
    if path:  # "grouped": every experts module of ours on that path
        for _, m in find_experts(model):
            m.impl = path
    model.generation_config.pad_token_id = 0
    return model


def settle(call, max_calls: int = 20, tol: float = 0.2) -> int:
    """Call `call` until three calls in a row take within tol of one another, at most max_calls times; returns how
    many it took. A compiled model is not at its speed after one call: a new shape compiles (and recompiles, once
    dynamic), CUDA graphs record on a later call, and Inductor may run slower code while its kernels compile in the
    background (a CPU run of 1f6f682 timed prefill at 28 tokens/s for what took 4 ms a few calls later)."""
    times = []
    for n in range(1, max_calls + 1):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if n >= 3 and max(times[-3:]) <= (1 + tol) * min(times[-3:]):
            return n
    return max_calls


def time_prefill(model, P: int, device, forward=None) -> dict:
    """One forward over P tokens at batch 1 (through `forward`, e.g. a compiled one, default the model), timed once
    its speed has settled."""
    forward = forward or model
    gen = torch.Generator(device).manual_seed(P)
    ids = [torch.randint(0, model.config.vocab_size, (1, P), generator=gen, device=device) for _ in range(2)]
    with torch.no_grad():
        warm = settle(lambda: (forward(input_ids=ids[0]), _sync(device)))
        t = median_ms(lambda i: forward(input_ids=ids[i]), 2, device, min_repeats=3, max_repeats=10)
    return dict(tokens=P, ms=t["ms"], tokens_per_s=P / t["ms"] * 1e3, peak_gb=t["peak_gb"], warmup_calls=warm)


class StepClock:
    """A logits processor that records the time (after a device sync) at each generation step: the first call
    comes after the prompt's forward, each later one after a decode step."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def greedy(model, ids, new: int, compile_: bool, **kwargs):
    """Exactly `new` greedy tokens after ids through transformers' generate with a static cache; compile_:
    generate compiles its decode step (CompileConfig's reduce-overhead), else it is kept eager."""
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          cache_implementation="static", disable_compile=not compile_, **kwargs)


def time_decode(model, B: int, new: int, device, compile_: bool = False, repeats: int = 3,
                prompt: int = 32) -> tuple[dict, torch.Tensor]:
    """Greedy generate with a static cache: decode tokens/s from the first generated token to the last (see the
    module notes), and the generated tokens [B, new]. compile_: generate compiles its decode step (CompileConfig's
    reduce-overhead); else it is kept eager."""
    from transformers import LogitsProcessorList

    gen = torch.Generator(device).manual_seed(B)
    ids = torch.randint(1, model.config.vocab_size, (B, prompt), generator=gen, device=device)

    def run():  # (seconds of the new - 1 decode steps, the output)
        clock = StepClock(device)
        out = greedy(model, ids, new, compile_, logits_processor=LogitsProcessorList([clock]))
        assert len(clock.times) == new, (len(clock.times), new)
        return clock.times[-1] - clock.times[0], out

    warm = settle(run)  # compilation, graph recording
    timed = [run() for _ in range(repeats)]
    seconds = statistics.median(t for t, _ in timed)
    return (dict(batch=B, new_tokens=new, decode_seconds=seconds, warmup_calls=warm,
                 tokens_per_s=B * (new - 1) / seconds), timed[0][1][:, prompt:].cpu())


class GraphDecoder:
    """Greedy decoding of B rows the way a lean server runs it (module notes): a static cache of max_len
    positions, the prompt through one eager forward, then one `_advance` a token: the forward of B tokens at one
    position, the argmax, and the token written into the next step's input and into the output (gpt-fast's loop,
    sampling in the step). compile_: the step compiled (fullgraph on CUDA) and, on CUDA, `_advance` captured once
    by hand into a torch.cuda.CUDAGraph over static buffers (token, position, output column), so that a token costs
    the host one replay and nothing else: no guards, no cudagraph-tree bookkeeping, no input copies (torch.compile's
    reduce-overhead step left the host at 1.0-1.1 ms a token against 0.65 ms of device time, 8b7a785). Like
    `greedy`, the end-of-sequence tokens are never chosen (generate's min_new_tokens), so both produce exactly
    `new` tokens and the same ones."""

    def __init__(self, model, max_len: int, compile_: bool):
        from transformers import StaticCache

        self.model, self.cache = model, StaticCache(config=model.config, max_cache_len=max_len)
        # transformers 5.25 renamed the forward's past_key_values to cache (the old name warns); 5.17 has the old
        self.kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        eos = model.generation_config.eos_token_id
        self.eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        # fullgraph on CUDA (one graph a step, or an error: what this loop is for); a CPU's experts take the
        # host-synced fallback (layers._padded_bmm), which breaks the graph
        self.graphed = compile_ and next(model.parameters()).device.type == "cuda"
        self.step = torch.compile(self._step, fullgraph=self.graphed) if compile_ else self._step
        self.graph, self.bufs = None, None  # the captured _advance, and (token [B, 1], position [1], column
        # [B, 1], output [B, new]) it reads and writes

    def _next(self, logits_BV):
        logits_BV = logits_BV.float()
        if self.eos:
            logits_BV[:, self.eos] = float("-inf")
        return logits_BV.argmax(-1, keepdim=True)  # [B, 1]

    def _step(self, tok_B1, pos_1):
        out = self.model(input_ids=tok_B1, cache_position=pos_1, use_cache=True, **{self.kw: self.cache})
        return self._next(out.logits[:, -1])

    def _advance(self):
        """One token, in place on the static buffers: out[:, col] = the next token; position and column + 1."""
        tok_B1, pos_1, col_B1, out_BN = self.bufs
        nxt_B1 = self.step(tok_B1, pos_1)
        tok_B1.copy_(nxt_B1)
        out_BN.scatter_(1, col_B1, nxt_B1)
        pos_1.add_(1)
        col_B1.add_(1)

    def _prefill(self, ids_BP) -> torch.Tensor:
        self.cache.reset()
        P, dev = ids_BP.shape[1], ids_BP.device
        out = self.model(input_ids=ids_BP, cache_position=torch.arange(P, device=dev), use_cache=True,
                         logits_to_keep=1, **{self.kw: self.cache})
        return self._next(out.logits[:, -1])

    def _start(self, ids_BP, new: int):
        """Prefill, and the static buffers set for the first decode step (allocated, and the graph captured after
        three warm-up steps on a side stream, at the first call and whenever `new` changes; the batch size is the
        static cache's, fixed at the first call: one decoder per batch size)."""
        first_B1 = self._prefill(ids_BP)
        (B, P), dev = ids_BP.shape, ids_BP.device
        if self.bufs is None or self.bufs[3].shape != (B, new):
            self.graph = None
            self.bufs = (first_B1.clone(), torch.zeros(1, dtype=torch.long, device=dev),
                         torch.zeros(B, 1, dtype=torch.long, device=dev),
                         torch.zeros(B, new, dtype=first_B1.dtype, device=dev))
        tok_B1, pos_1, col_B1, out_BN = self.bufs
        tok_B1.copy_(first_B1), pos_1.fill_(P), col_B1.fill_(1), out_BN[:, :1].copy_(first_B1)
        if self.graphed and self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._advance()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._advance()
            return self._start(ids_BP, new)  # the warm-up and the capture advanced the cache and buffers
        return out_BN

    def __call__(self, ids_BP, new: int, clock=None) -> torch.Tensor:
        """The `new` tokens after ids_BP [B, P], [B, new]; clock(): called once the first token is out, and
        after the last."""
        out_BN = self._start(ids_BP, new)
        clock and clock()
        for _ in range(new - 1):
            self.graph.replay() if self.graph is not None else self._advance()
        clock and clock()
        return out_BN.clone()


def time_graph_decode(model, B: int, new: int, device, compile_: bool = False, repeats: int = 3,
                      prompt: int = 32) -> tuple[dict, torch.Tensor]:
    """GraphDecoder's decode tokens/s from the first generated token to the last (synced at both ends only), and
    its tokens [B, new]; the same prompt as time_decode's."""
    gen = torch.Generator(device).manual_seed(B)
    ids = torch.randint(1, model.config.vocab_size, (B, prompt), generator=gen, device=device)
    decode = GraphDecoder(model, prompt + new, compile_)

    def run():
        times = []
        out = decode(ids, new, clock=lambda: (_sync(device), times.append(time.perf_counter())))
        return times[1] - times[0], out

    with torch.no_grad():
        warm = settle(run)
        timed = [run() for _ in range(repeats)]
    seconds = statistics.median(t for t, _ in timed)
    return (dict(batch=B, new_tokens=new, decode_seconds=seconds, warmup_calls=warm,
                 tokens_per_s=B * (new - 1) / seconds), timed[0][1].cpu())


def bench_generate(specs, impls, prefill, batches, new_tokens, device, dtype, budget, compile_: bool,
                   on_row=None, loops=("generate", "graph")) -> dict:
    """Every implementation of every model, one after another; on_row(result so far) after each row."""
    rows = []
    meta = dict(prefill=list(prefill), batches=list(batches), new_tokens=new_tokens, budget=budget, compile=compile_,
                loops=list(loops), dtype=str(dtype).removeprefix("torch."), device=device_name(device),
                torch=torch.__version__, date=today())
    for spec in specs:
        reference = None
        for impl in impls:
            row = dict(model=model_config(spec)[0], impl=impl)
            say = lambda what: print(f"[bench generate] {row['model']} {impl}: {what}", flush=True)  # noqa: E731
            try:
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                if compile_:  # each implementation compiles from scratch: no recompile limit left over, no
                    torch._dynamo.reset()  # guards or cached graphs of the one before it
                model = build(spec, impl, device, dtype, budget)
                e = efficiency(model)  # decode bytes: what a batch-1 step reads, the active parameters
                row.update(params=e["total_params"],
                           decode_bytes=e["active_params"] * next(model.parameters()).element_size())
                forward = torch.compile(model.forward, mode="reduce-overhead") if compile_ else None
                row["prefill"] = []
                for P in prefill:
                    row["prefill"].append(time_prefill(model, P, device, forward))
                    say(f"prefill {P}: {row['prefill'][-1]['tokens_per_s']:,.0f} tokens/s")
                decoded, graphed = [], []
                for B in batches:
                    if "generate" in loops:
                        decoded.append(time_decode(model, B, new_tokens, device, compile_))
                        say(f"decode batch {B}: {decoded[-1][0]['tokens_per_s']:,.1f} tokens/s")
                    if "graph" in loops and "graph_error" not in row:
                        try:  # a loop that cannot compile here costs its own cells, not generate's
                            graphed.append(time_graph_decode(model, B, new_tokens, device, compile_))
                            say(f"decode batch {B}, graph loop: {graphed[-1][0]['tokens_per_s']:,.1f} tokens/s")
                        except Exception as e:  # noqa: BLE001
                            row["graph_error"] = error_record(e)
                            say(f"graph loop failed: {row['graph_error']}")
                            graphed = []
                row["decode"], row["decode_graph"] = [d for d, _ in decoded], [d for d, _ in graphed]
                if decoded and len(graphed) == len(decoded):  # the same greedy function: the same tokens
                    row["graph_same_tokens"] = all(torch.equal(a[1], b[1]) for a, b in zip(decoded, graphed))
                tokens = (decoded or graphed)[0][1]
                if reference is None and impl in STANDARD:
                    reference = (impl, tokens)
                row["tokens_reference"] = reference and reference[0]
                row["same_tokens_as_reference"] = None if reference is None else bool(torch.equal(tokens, reference[1]))
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if torch.device(device).type == "cuda" \
                    else None
                del model, forward
            except Exception as e:  # noqa: BLE001  (an implementation that cannot run here is a result)
                row["error"] = error_record(e)
                say(f"failed: {row['error']}")
            rows.append(row)
            if on_row is not None:
                on_row(dict(meta, rows=list(rows)))
    return dict(meta, rows=rows)


def report(result: dict) -> str:
    """Markdown: per model, prefill and decode tokens/s of each implementation, MoLAE's speed-up over the
    fastest standard one, and that against the ratio of decode bytes (the target: 80% of it)."""
    r = result
    lines = ["# Whole-model generation: `molae bench generate`", "",
             f"- command: `{r.get('command', '')}`", f"- device: {r['device']}; torch {r['torch']}; date {r['date']}; "
             f"commit `{r.get('commit', 'unknown')}`; {r['dtype']}; compile: {r['compile']}",
             f"- MoLAE: data-free, gate, up and down factorized at {100 * r['budget']:g}% of the routed-expert "
             "parameters, G = 1; decode: greedy `generate`, static cache, tokens/s from the first generated token "
             "to the last", ""]
    for model in dict.fromkeys(x["model"] for x in r["rows"]):
        rows = [x for x in r["rows"] if x["model"] == model]
        loops = [k for k, _ in LOOPS if any(x.get(k) for x in rows)]
        heads = [f"{label} B={b}" for k, label in LOOPS if k in loops for b in r["batches"]]
        lines += [f"## {model}", "",
                  "| impl | params | decode bytes/token | " + " | ".join(f"prefill {p}" for p in r["prefill"]) + " | "
                  + " | ".join(heads) + " | peak GB | greedy tokens = reference's |",
                  "|---|---:|---:|" + "---:|" * (len(r["prefill"]) + len(heads)) + "---:|---|"]
        for x in rows:
            if "error" in x:
                lines.append(f"| {x['impl']} | failed: {x['error']} |")
                continue
            cells = [f"{p['tokens_per_s']:,.0f}" for p in x["prefill"]]
            for k in loops:  # a loop that failed (graph_error) leaves its cells empty
                cells += [f"{d['tokens_per_s']:,.1f}" for d in x[k]] if x.get(k) else [""] * len(r["batches"])
            peak = "" if x["peak_gb"] is None else f"{x['peak_gb']:.1f}"
            same = x["same_tokens_as_reference"]
            same = "" if same is None else f"{same} ({x['tokens_reference']})"
            lines.append(f"| {x['impl']} | {x['params'] / 1e6:,.1f}M | {x['decode_bytes'] / 1e6:,.1f} MB | "
                         + " | ".join(cells) + f" | {peak} | {same} |")
        graph_same = [x["graph_same_tokens"] for x in rows if "graph_same_tokens" in x]
        graph_failed = [f"{x['impl']} ({x['graph_error']})" for x in rows if "graph_error" in x]
        lines += ["", "Cells: tokens/s. decode: transformers' `generate`; graph: the graph loop (one compiled step a "
                  "token). The reference: the first standard implementation run (the standard ones compute the same "
                  "function, so they should agree; MoLAE need not)."
                  + (f" Graph loop's tokens = generate's: {sum(graph_same)} of {len(graph_same)} implementations."
                     if graph_same else "")
                  + (f" Graph loop failed: {'; '.join(graph_failed)}." if graph_failed else ""), ""]
        lines += _speedups(r, rows)
    return "\n".join(lines) + "\n"


def _speedups(r, rows) -> list[str]:
    ok = [x for x in rows if "error" not in x]
    mol = next((x for x in ok if x["impl"] == "molae"), None)
    std = [x for x in ok if x["impl"] in STANDARD]
    if mol is None or not std:
        return []
    lines = ["| measure | fastest standard | MoLAE speed-up | bytes ratio (standard / MoLAE) "
             "| speed-up / bytes ratio |", "|---|---|---:|---:|---:|"]
    for key, label in LOOPS:
        if not mol.get(key) or not all(x.get(key) for x in std):
            continue
        for i, b in enumerate(r["batches"]):
            best = max(std, key=lambda x: x[key][i]["tokens_per_s"])
            s = mol[key][i]["tokens_per_s"] / best[key][i]["tokens_per_s"]
            ratio = best["decode_bytes"] / mol["decode_bytes"]
            lines.append(f"| {label} B={b} | {best['impl']} | {s:.2f}x | {ratio:.2f}x | {100 * s / ratio:.0f}% |")
    for i, p in enumerate(r["prefill"]):
        best = max(std, key=lambda x: x["prefill"][i]["tokens_per_s"])
        s = mol["prefill"][i]["tokens_per_s"] / best["prefill"][i]["tokens_per_s"]
        lines.append(f"| prefill {p} | {best['impl']} | {s:.2f}x | | |")
    return lines + ["", "Target (issue [12]): whole-model decode at batch 1, speed-up at least 80% of the bytes ratio.",
                    ""]


def cmd_bench_generate(args):
    import subprocess
    import sys

    import transformers

    from ..checkpoint import write_json_atomically, write_text_atomically

    specs = args.model or ["qwen3-30b-a3b:4", "deepseek-v3:2"]
    for s in specs:
        model_config(s)  # every --model checked before any is built
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip() or "unknown"
    run = dict(commit=commit, command=args.command or "molae " + " ".join(sys.argv[1:]),
               transformers=transformers.__version__)

    def partial(result):  # what has finished so far, in place of the final files until they are written
        write_json_atomically(args.out / "generate.json", dict(result, **run, partial=True))

    result = bench_generate(specs, args.impls, args.prefill, args.batch, args.new_tokens, args.device,
                            getattr(torch, args.dtype), args.budget, args.compile, on_row=partial, loops=args.loops)
    result.update(run)
    write_json_atomically(args.out / "generate.json", result)
    write_text_atomically(args.out / "generate.md", report(result))
    failed = [f"{x['model']} {x['impl']}" for x in result["rows"] if "error" in x]
    print(report(result).rstrip())
    print(f"wrote generate.json and generate.md under {args.out}"
          + (f" ({len(failed)} failed: {', '.join(failed)})" if failed else ""))


def add_commands(bench):
    """This benchmark's `molae bench` subcommands."""
    bg = add_command(bench, "generate", cmd_bench_generate, outputs={"out": "writable"}, devices=("device",),
                     help="a whole model generating text: original (transformers' experts, ours) against MoLAE",
                     description="Build each model (a real model's shapes with a few layers, or a checkpoint), "
                                 "time prefill and greedy decode with transformers' generate for each "
                                 "implementation side by side, and write generate.json and generate.md.")
    bg.add_argument("--model", action="append", default=None, metavar="NAME:LAYERS|DIR",
                    help=f"NAME one of {', '.join(REAL_MODELS)} with its first LAYERS MoE layers, or a checkpoint "
                         "directory; repeatable (default qwen3-30b-a3b:4 and deepseek-v3:2)")
    bg.add_argument("--impls", type=comma_list(IMPLS), default=IMPLS, help=f"default all: {','.join(IMPLS)}")
    bg.add_argument("--prefill", type=int_list, default=[512, 2048, 8192],
                    help="prompt lengths (default 512,2048,8192)")
    bg.add_argument("--batch", type=int_list, default=[1, 8, 32], help="decode batch sizes (default 1,8,32)")
    bg.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated per decode (default 64)")
    bg.add_argument("--budget", type=fraction, default=0.5,
                    help="MoLAE: fraction of the routed-expert parameters kept (default 0.5)")
    bg.add_argument("--compile", action="store_true", help="torch.compile the forward (mode reduce-overhead)")
    bg.add_argument("--loops", type=comma_list(("generate", "graph")), default=("generate", "graph"),
                    help="decode loops timed: transformers' generate, and the graph loop (one compiled step a token, "
                         "as gpt-fast decodes); default both")
    bg.add_argument("--device", default="cuda", help="cuda (default) or cpu (for trying the harness)")
    bg.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="weights and activations (default bfloat16)")
    bg.add_argument("--out", type=Path, default=Path("results"), help="where generate.json and generate.md go")
    bg.add_argument("--commit", default=None, help="the git commit measured (default: git rev-parse HEAD)")
    bg.add_argument("--command", default=None, help="the exact command, recorded (default: this one)")
