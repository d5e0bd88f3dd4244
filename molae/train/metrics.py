"""What a run measures: the MFU denominator, training FLOPs per token, routed load, non-finite gradients,
and DeepSeek-V3's loss-free bias update."""

from __future__ import annotations

import numpy as np
import torch

from ..expert_parallel import ExpertParallelExperts
from ..layers import Experts
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
        self.counts, self.handles = {}, []
        for name, m in find_experts(model):
            if isinstance(m, (Experts, ExpertParallelExperts)):
                self.handles.append(m.register_forward_hook(self._hook(layer_index(name), m.n_experts)))

    def _hook(self, layer, E):
        def hook(module, args, output):
            idx = args[1].detach().reshape(-1)
            c = torch.bincount(idx, minlength=E)
            self.counts[layer] = self.counts[layer] + c if layer in self.counts else c
        return hook

    def take(self) -> dict[int, torch.Tensor]:
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


def update_router_bias(model, counts: dict[int, torch.Tensor], speed: float):
    """DeepSeek-V3's auxiliary-loss-free balancing: b_e += speed * sign(mean load - load_e)."""
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias") and layer_index(name) in counts:
            load = counts[layer_index(name)].float()
            buf.add_(speed * torch.sign(load.mean() - load).to(buf.dtype))
