"""What a run measures: the MFU denominator, training FLOPs per token, routed load, non-finite gradients,
and DeepSeek-V3's loss-free bias update."""

from __future__ import annotations

import numpy as np
import torch

from ..expert_parallel import ExpertParallelExperts
from ..layers import Experts, expert_counts
from ..models import find_experts, layer_index


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the training dtype on this device (the MFU denominator): the
    fastest of six timed repeats (bench.layer.matmul_rate), since a machine busy with other work during the
    measurement slows some repeats (a median then made MFU read above 100% on a shared CPU). On a CPU this
    is the rate of one float32 1024^3 matmul on the cores torch uses, not a datasheet peak."""
    from ..bench.layer import matmul_rate

    size = 8192 if device.type == "cuda" else 1024
    return matmul_rate(device, dtype, size, warmup=2, min_repeats=6, max_repeats=6)["fastest"]


def train_flops_per_token(config, forward_flops: int, seq_len: int) -> float:
    """PaLM-style: 3 x the forward's matmul FLOPs (evaluate.efficiency: active weights, routed experts
    by MOLAE.md §2's terms) + 12 * layers * heads * head_dim * seq_len for attention."""
    c = config
    head_dim = getattr(c, "v_head_dim", None) or getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * head_dim * seq_len
    return 3 * forward_flops + attn


class LoadMeter:
    """Counts routed slots per expert per MoE layer, on the device, from the experts' inputs."""

    def __init__(self, model):
        self.counts, self.pending, self.handles = {}, {}, []
        for name, m in find_experts(model):
            if isinstance(m, (Experts, ExpertParallelExperts)):
                self.handles.append(m.register_forward_hook(self._hook(layer_index(name), m.n_experts)))

    def _hook(self, layer, E):
        def hook(module, args, output):  # traceable whole: it runs inside the compiled layers
            if layer not in self.pending:  # (not setdefault(...).append: Dynamo cannot follow that list)
                self.pending[layer] = []
            self.pending[layer].append(expert_counts(args[1].detach(), E))
        return hook

    def settle(self):
        """Add the forwards' counts since the last call into new tensors: where the layers are compiled with CUDA
        graphs, a hook's output lives in a graph's buffer, which the next replay of that graph overwrites."""
        for layer, cs in self.pending.items():
            start = self.counts[layer] if layer in self.counts else cs.pop(0).clone()
            self.counts[layer] = sum(cs, start)
        self.pending = {}

    def discard(self):
        """Forget what was counted (an evaluation's forwards, a diagnostic re-run), without reading it."""
        self.counts, self.pending = {}, {}

    def take(self) -> dict[int, torch.Tensor]:
        self.settle()
        counts, self.counts = self.counts, {}
        return counts

    @staticmethod
    def imbalance(counts: dict[int, torch.Tensor]) -> float | None:
        """Mean over layers of max expert load / mean expert load (1.0 = perfectly balanced)."""
        if not counts:
            return None
        r = [(c.max() / c.float().mean().clamp_min(1e-9)).item() for c in counts.values()]
        return float(np.mean(r))


def nonfinite_grads(model) -> list[str]:
    """Names of the parameters whose (local) gradient holds a NaN or an infinity."""
    out = []
    for n, p in model.named_parameters():
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if g is not None and not torch.isfinite(g).all():
            out.append(n)
    return out


def nonfinite_summary(model) -> dict:
    """How many parameters have a non-finite gradient, and the first and last (deepest) four in model order.
    A NaN that arises in the backward reaches every parameter below where it arose, so the deepest names say
    more than the first ones (the embeddings, always)."""
    bad = nonfinite_grads(model)
    return dict(count=len(bad), of=sum(1 for _ in model.parameters()), first=bad[:4], deepest=bad[-4:])


def _tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors in a module's output (a tensor, tuple, list or dict-like ModelOutput)."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _tensors(x)]
    if isinstance(out, dict):
        return [t for x in out.values() for t in _tensors(x)]
    return []


def locate_nonfinite(model, step) -> dict:
    """Where a non-finite gradient arises. step() re-runs one step's forward and backward (the same batch);
    it runs eagerly (torch.compile's stance forced to eager) with a hook on every module's output: the first
    module, in forward order, whose output is non-finite, and in backward order the first module whose output
    gradient is non-finite with the last one before it whose gradient was finite: the non-finite value arose
    in the operations between the two (the first one's output is consumed there). backward_trail narrows it:
    the gradients of modules' outputs and of their inputs ("NAME<" : what reaches NAME's input, which tells a
    module's own backward from the code between modules) in the order they arrived, each with its largest
    magnitude (a finite value near bf16's 3.4e38 is an overflow, a small one a NaN from elsewhere), every one
    up to the first non-finite (a few hundred entries: where the magnitudes grow is where an explosion starts).
    forward_absmax: each module's largest output magnitude in forward order (an activation that explodes shows
    there), and for norms the smallest root-mean-square of an input row with its token id and position (a norm
    multiplies the gradient of a row by up to weight / max(rms, sqrt(eps)): a vanishing row amplifies it).
    Costs one extra step with a host sync per module, so the trainer calls it once per run, on the first
    skipped step."""
    names = {m: n for n, m in model.named_modules() if n}
    forward_bad, grads, trail, forward_absmax, token_ids = [], [], [], [], []

    def record(name, g, output):
        finite = bool(torch.isfinite(g).all())
        if output:
            grads.append((name, finite))
        trail.append((name if output else name + "<", finite, float(g.float().abs().amax()) if finite else None))

    def hook(module, args, out):
        ts, n = _tensors(out), names[module]
        if not forward_bad and any(not torch.isfinite(t).all() for t in ts):
            forward_bad.append(n)
        if isinstance(module, torch.nn.Embedding):
            token_ids.append(args[0])
        if ts:
            forward_absmax.append(dict(name=n, absmax=max(float(t.detach().float().abs().amax()) for t in ts)))
            if "Norm" in type(module).__name__ and args and torch.is_tensor(args[0]):  # its smallest input row
                ms = args[0].detach().float().pow(2).mean(-1).reshape(-1)
                i = int(ms.argmin())
                forward_absmax[-1].update(input_min_rms=float(ms[i].sqrt()), row=i)
        for t in _tensors(args):
            if t.requires_grad:
                t.register_hook(lambda g, n=n: record(n, g, False))
        for t in ts:
            if t.requires_grad:
                t.register_hook(lambda g, n=n: record(n, g, True))

    handles = [m.register_forward_hook(hook) for m in names]
    model.zero_grad(set_to_none=True)
    try:
        with torch.compiler.set_stance("force_eager"):
            loss = step()
    finally:
        for h in handles:
            h.remove()
    params = nonfinite_summary(model)
    if token_ids:  # a norm's smallest row as (token id, position in its sequence)
        flat, T = token_ids[0].reshape(-1), token_ids[0].shape[-1]
        for r in forward_absmax:
            if "row" in r and r["row"] < flat.numel():  # (a norm over other rows than the tokens': left as is)
                r.update(token=int(flat[r["row"]]), position=r["row"] % T)
    first = next((i for i, (_, ok) in enumerate(grads) if not ok), None)
    before = None if first is None else next((n for n, ok in reversed(grads[:first]) if ok), None)
    end = next((i for i, (_, ok, _) in enumerate(trail) if not ok), None)
    return dict(reproduced=params["count"] > 0, loss_finite=bool(torch.isfinite(loss)),
                forward_first_nonfinite=forward_bad[0] if forward_bad else None,
                backward_first_nonfinite=None if first is None else grads[first][0],
                backward_last_finite_before=before, params=params,
                backward_trail=[] if end is None else [dict(name=n, finite=ok, absmax=a)
                                                        for n, ok, a in trail[:end + 1]],
                forward_absmax=forward_absmax)


def update_router_bias(model, counts: dict[int, torch.Tensor], speed: float):
    """DeepSeek-V3's auxiliary-loss-free balancing: b_e += speed * sign(mean load - load_e)."""
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias") and layer_index(name) in counts:
            load = counts[layer_index(name)].float()
            buf.add_(speed * torch.sign(load.mean() - load).to(buf.dtype))
