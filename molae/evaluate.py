"""`molae eval`: perplexity on text files and an efficiency report, for MoE and MoLAE models alike.

Perplexity uses sliding windows of `context` tokens that advance by `stride` (<= context - 1):
window k scores the tokens [end_{k-1}, end_k) given everything in [end_k - context, end_k),
so every token but the first is scored exactly once, with at least context - stride tokens
of left context (all of them when the text fits one window: then perplexity is exactly
exp(mean NLL of tokens 2..T)). Bits per byte = scored NLL in bits / UTF-8 bytes of the text.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from .command import progress_bar

from .layers import Experts
from .models import find_experts, hf_expert_weights, is_embedding


def read_text(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--text {path} is a directory: pass a UTF-8 text file")
    if not path.is_file():
        raise ValueError(f"--text {path} does not exist: pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path} is not UTF-8 (byte {e.start}): convert it to UTF-8") from None
    if not text.strip():
        raise ValueError(f"--text {path} is empty: pass a file with text in it")
    return text


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, score_from, end) per window: tokens [score_from, end) scored with [begin, end) as input."""
    if not 1 <= stride < context:
        raise ValueError(f"stride={stride} is out of range: allowed 1 <= stride <= context - 1 = {context - 1}")
    out, prev_end = [], 1  # token 0 has no left context: never scored
    while prev_end < n_tokens:
        end = min(n_tokens, prev_end + stride) if out else min(n_tokens, context)
        out.append((max(0, end - context), prev_end, end))
        prev_end = end
    return out


@torch.no_grad()
def token_scores(model, x_BT: torch.Tensor, attention_mask=None, amp=contextlib.nullcontext, hits: bool = False):
    """([B, T-1] next-token NLL (nats), with `hits` [B, T-1] whether the argmax was that token, else None) of
    tokens 1..T-1 of each row, the model reading tokens 0..T-2: the one place molae turns logits into losses
    (sliding-window perplexity, fixed windows, validation, the demo)."""
    with amp():
        logits = model(input_ids=x_BT[:, :-1],
                       attention_mask=None if attention_mask is None else attention_mask[:, :-1]).logits
    logits = logits if logits.dtype == torch.float64 else logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), x_BT[:, 1:], reduction="none")
    return nll, (logits.argmax(-1) == x_BT[:, 1:]) if hits else None


def token_nlls(model, x_BT: torch.Tensor, attention_mask=None, amp=contextlib.nullcontext) -> torch.Tensor:
    """[B, T-1] next-token NLL (nats): `token_scores` without the argmax hits."""
    return token_scores(model, x_BT, attention_mask, amp)[0]


def window_scores(model, windows_WT: torch.Tensor, batch_size: int, device, amp=contextlib.nullcontext,
                  hits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([W] summed next-token NLL (nats, float64, on device) of each [T+1] window (T tokens scored each), with
    `hits` [W, T] argmax hits (CPU), else None)."""
    nll, hit = [], []
    for i in range(0, len(windows_WT), batch_size):
        n, h = token_scores(model, windows_WT[i:i + batch_size].to(device), amp=amp, hits=hits)
        nll.append(n.double().sum(1))
        hit.append(h.cpu() if hits else None)
    return torch.cat(nll), torch.cat(hit) if hits else None


def window_nlls(model, windows_WT: torch.Tensor, batch_size: int, device, amp=contextlib.nullcontext) -> torch.Tensor:
    """[W] summed next-token NLL (nats, float64, on device) of each [T+1] window: `window_scores` without hits."""
    return window_scores(model, windows_WT, batch_size, device, amp)[0]


def newline_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """[V] bool: the tokens whose text holds a newline (the ends of lines)."""
    return torch.tensor(["\n" in tokenizer.decode([i]) for i in range(vocab_size)])


def line_exact_match(windows_WT: torch.Tensor, hit_WT: torch.Tensor, newline_V: torch.Tensor,
                     min_tokens: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-match next-line completion, per window: ([W] lines completed exactly, [W] lines scored). A line is
    the tokens after a newline-holding token up to and including the next one (at least `min_tokens` of them):
    greedy decoding from its true prefix writes it exactly iff the argmax was right at each of its tokens, so
    the teacher-forced hits of one forward pass score it. The partial lines at a window's ends are not scored."""
    is_nl_WT = newline_V[windows_WT[:, 1:]]  # at target positions
    matched, lines = torch.zeros(len(windows_WT), dtype=torch.long), torch.zeros(len(windows_WT), dtype=torch.long)
    for w in range(len(windows_WT)):
        ends = is_nl_WT[w].nonzero().flatten().tolist()
        for a, b in zip(ends, ends[1:]):
            if b - a >= min_tokens:
                lines[w] += 1
                matched[w] += bool(hit_WT[w, a + 1:b + 1].all())
    return matched, lines


def ratio_interval(num_W, den_W, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (over windows, `bootstrap_means`' resampling) of sum(num) / sum(den)."""
    num_den_RW = torch.stack([torch.as_tensor(num_W), torch.as_tensor(den_W)])
    m = bootstrap_means(num_den_RW, n, seed)
    r = m[:, 0] / m[:, 1].clamp_min(1 / num_den_RW.shape[1])  # (means: the sums' ratio; a sum below 1 counts as 1)
    return float(torch.quantile(r, 0.025)), float(torch.quantile(r, 0.975))


def windows_nll(model, windows_WT: torch.Tensor, batch_size: int, device, amp=contextlib.nullcontext) -> torch.Tensor:
    """[summed next-token NLL (nats), scored tokens] (float64, on device) over [W, T+1] windows."""
    nll = window_nlls(model, windows_WT, batch_size, device, amp)
    return torch.stack([nll.sum(), torch.tensor(float(windows_WT[:, 1:].numel()), device=nll.device,
                                                dtype=torch.float64)])


def bootstrap_means(nll_RW: torch.Tensor, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """[n, R] mean NLL of each row of nll_RW (R runs scored on the same W windows: mean NLL per window) over n
    resamplings of the windows, the same resampling for every row (so differences between rows are paired)."""
    g = torch.Generator().manual_seed(seed)
    idx_NW = torch.randint(0, nll_RW.shape[1], (n, nll_RW.shape[1]), generator=g)
    return nll_RW.double()[:, idx_NW].mean(-1).T


def perplexity_interval(nll_W, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (over windows) of the perplexity exp(mean NLL); nll_W: mean NLL per window."""
    m = bootstrap_means(torch.as_tensor(nll_W)[None], n, seed)[:, 0].exp()
    return float(torch.quantile(m, 0.025)), float(torch.quantile(m, 0.975))


def paired_change(new_W, ref_W, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(change, 2.5%, 97.5%) of perplexity(new) / perplexity(ref) - 1, both scored on the same windows (mean NLL
    per window), the interval by a paired bootstrap over the windows. "Better" only where it excludes zero."""
    new, ref = torch.as_tensor(new_W).double(), torch.as_tensor(ref_W).double()
    d = bootstrap_means(torch.stack([new, ref]), n, seed)
    r = (d[:, 0] - d[:, 1]).exp() - 1
    return float((new.mean() - ref.mean()).exp() - 1), float(torch.quantile(r, 0.025)), float(torch.quantile(r, 0.975))


def verdict(change_95: tuple[float, float]) -> str:
    """"better" / "worse" where a paired interval of a change excludes zero, "tied" otherwise."""
    lo, hi = change_95
    return "better" if hi < 0 else "worse" if lo > 0 else "tied"


def window_bytes(tokenizer, windows_WT: torch.Tensor) -> int:
    """UTF-8 bytes of the scored tokens (all but each window's first), decoded: bits per byte's denominator."""
    return sum(len(tokenizer.decode(w[1:].tolist()).encode()) for w in windows_WT)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int, stride: int | None = None, batch_size: int = 8,
               progress: bool = True) -> dict:
    """Sliding-window NLL of a 1-D token tensor. Returns tokens scored, total and mean NLL (nats), perplexity."""
    stride = stride or context - 1
    device = next(model.parameters()).device
    wins = windows(len(ids), context, stride)
    total, count = 0.0, 0
    for i in progress_bar(range(0, len(wins), batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = wins[i:i + batch_size]
        width = max(end - begin for begin, _, end in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (begin, _, end) in enumerate(batch):  # right-padded; padding is never scored
            x[j, :end - begin] = ids[begin:end]
            mask[j, :end - begin] = 1
        nll = token_nlls(model, x.to(device), mask.to(device))  # nll[j, p] of token p + 1
        for j, (begin, score_from, end) in enumerate(batch):
            scored = nll[j, score_from - begin - 1:end - begin - 1]
            total += scored.double().sum().item()
            count += scored.numel()
    return dict(tokens=count, nll_sum=total, mean_nll=total / count, perplexity=math.exp(total / count))


def eval_text(model, tokenizer, path: Path, context: int | None = None, stride: int | None = None,
              batch_size: int = 8) -> dict:
    text = read_text(path)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if len(ids) < 2:
        raise ValueError(f"--text {path} has {len(ids)} token: need at least 2 to score one")
    context = context or model_context(model)
    out = perplexity(model, ids, context, stride, batch_size)
    n_bytes = len(text.encode("utf-8"))
    return dict(file=str(path), bytes=n_bytes, context=context, stride=stride or context - 1, **out,
                bits_per_byte=out["nll_sum"] / math.log(2) / n_bytes)


def model_context(model) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    return int(min(n, 4096)) if n else 2048


def check_context(model, context: int | None, stride: int | None):
    """--context within the model's positions and --stride within the context, before any scoring."""
    n = getattr(model.config, "max_position_embeddings", None)
    if context is not None and n and context > n:
        raise ValueError(f"--context {context} is longer than the model's {n} positions (max_position_embeddings): "
                         f"pass --context {n} or less")
    c = context or model_context(model)
    if stride is not None and not 1 <= stride < c:
        raise ValueError(f"stride={stride} is out of range: allowed 1 <= stride <= context - 1 = {c - 1}")


# ----------------------------------------------------------------------------- efficiency


def experts_shapes(module) -> dict:
    """E, m, n, groups and latent sizes of an experts module, HF's or ours."""
    if isinstance(module, Experts):
        return dict(E=module.n_experts, m=module.inter, n=module.dim, groups=module.groups, latent=module.latent)
    E, m, n = hf_expert_weights(module)["gate"].shape
    return dict(E=E, m=m, n=n, groups=1, latent={})


def efficiency(model, dtype_bytes: int | None = None) -> dict:
    """Parameters, weight bytes, FLOPs per token and expert-parallel all-to-all bytes per token.

    FLOPs per token count matrix multiplies (2 per multiply-add) of the forward pass: every
    non-expert weight matrix once, and per MoE layer MOLAE.md §2's expert terms: standard
    2*3*n*m*k; latent 2*n*d*t per factorized kind (shared projections, t = min(k, G) groups
    touched, an upper bound) + 2*m*d*k per factorized kind + 2*n*m*k per whole kind.
    Attention scores (which grow with context) are left out; a dense model has no expert terms. All-to-all
    bytes per token: dispatch sends each token's input to its k experts (the hidden state n, or the gate and
    up latents when both are factorized), combine returns n (or d_down when down is factorized).
    """
    k = getattr(model.config, "num_experts_per_tok", None)
    experts = find_experts(model)  # none in a dense model (the start of an upcycled run): every weight is active
    params = dict(model.named_parameters())
    expert_names = {f"{name}.{p}" for name, m in experts for p, _ in m.named_parameters()
                    if p not in getattr(m, "shared_params", ())}  # LatentMoE's projections are dense
    total = sum(p.numel() for p in params.values())
    routed = sum(params[n].numel() for n in expert_names)
    embedding = sum(p.numel() for n, p in params.items() if is_embedding(n))
    el = dtype_bytes or next(iter(params.values())).element_size()
    flops = 2 * sum(p.numel() for n, p in params.items() if n not in expert_names and p.dim() == 2
                    and "embed_tokens" not in n)
    active_routed, dispatch, combine, dispatch_std, combine_std = 0, 0, 0, 0, 0
    for _, m in experts:
        s = experts_shapes(m)
        F_, D, G, lat = s["m"], s["n"], s["groups"], s["latent"]
        t = min(k, G)
        for kind in ("gate", "up", "down"):
            if kind in lat:
                flops += 2 * D * lat[kind] * t + 2 * F_ * lat[kind] * k
                active_routed += t * D * lat[kind] + k * F_ * lat[kind]
            else:
                flops += 2 * D * F_ * k
                active_routed += k * D * F_
        both = "gate" in lat and "up" in lat
        dispatch += k * ((lat["gate"] + lat["up"]) if both else D)
        combine += k * (lat["down"] if "down" in lat else D)
        dispatch_std += k * D
        combine_std += k * D
    return dict(total_params=total, routed_expert_params=routed, non_embedding_params=total - embedding,
                active_params=total - routed + active_routed, weight_bytes=total * el,
                flops_per_token=flops, all_to_all_bytes_per_token=dict(
                    dispatch=dispatch * el, combine=combine * el,
                    standard_dispatch=dispatch_std * el, standard_combine=combine_std * el))


@torch.no_grad()
def measure_speed(model, prompt_tokens: int = 512, new_tokens: int = 64, repeats: int = 5) -> dict:
    """On a GPU: peak memory, prefill tokens/s (one forward over a prompt) and decode tokens/s
    (greedy generation with the KV cache), medians over repeats after a warm-up."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return {}
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), device=device)
    torch.cuda.reset_peak_memory_stats(device)

    def timed(fn):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    prefill = timed(lambda: model(input_ids=ids))
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    decode = timed(lambda: model.generate(ids[:, :16], **gen))
    return dict(device=torch.cuda.get_device_name(device), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                prefill_tokens_per_s=prompt_tokens / prefill, decode_tokens_per_s=new_tokens / decode,
                peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9)


def load(model_path: str, device: str = "cpu", dtype: str = "auto", need_tokenizer: bool = True):
    """A causal LM (MoE or MoLAE) and its tokenizer, from a directory or hub id; in eval mode. Without
    need_tokenizer, a model that has none comes with tokenizer None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import SourceCheckpoint, resolve

    path = resolve(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{model_path} is not a model: no config.json in {path}")
    if any(path.glob("*.safetensors")):  # every shard's header, read up front: damage is one line, not a traceback
        SourceCheckpoint(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{model_path} cannot be loaded as a causal LM with its tokenizer ({_first_line(e)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        if need_tokenizer:
            raise ValueError(f"{model_path} cannot be loaded as a causal LM with its tokenizer ({_first_line(e)})") \
                from None
        tokenizer = None
    model.config.output_router_logits = False  # a training setting; evaluation needs no aux loss
    return model.to(device).eval(), tokenizer


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def format_eval(result: dict) -> str:
    lines = ["| text | tokens | bytes | mean NLL | perplexity | bits/byte |", "|---|---:|---:|---:|---:|---:|"]
    for r in result.get("texts") or []:
        lines.append(f"| {r['file']} | {r['tokens']:,} | {r['bytes']:,} | {r['mean_nll']:.4f} | "
                     f"{r['perplexity']:.3f} | {r['bits_per_byte']:.4f} |")
    for task, metrics in (result.get("tasks") or {}).items():
        lines += ["", f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())]
    sp = result.get("speed")
    if sp:
        lines += ["", f"{sp['device']}: prefill {sp['prefill_tokens_per_s']:,.0f} tokens/s ({sp['prompt_tokens']}-token "
                      f"prompt), decode {sp['decode_tokens_per_s']:,.1f} tokens/s, peak memory "
                      f"{sp['peak_memory_gb']:.2f} GB"]
    e = result.get("efficiency")
    if e:
        a2a = e["all_to_all_bytes_per_token"]
        lines += ["", "| parameters: total | active | routed experts | non-embedding | weight bytes | "
                      "GFLOP/token | all-to-all bytes/token (dispatch + combine; standard layout) |",
                  "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {e['total_params']:,} | {e['active_params']:,} | {e['routed_expert_params']:,} | "
                  f"{e['non_embedding_params']:,} | {e['weight_bytes']:,} | {e['flops_per_token'] / 1e9:.4f} | "
                  f"{a2a['dispatch']:,} + {a2a['combine']:,}; {a2a['standard_dispatch']:,} + "
                  f"{a2a['standard_combine']:,} |"]
    return "\n".join(lines)
