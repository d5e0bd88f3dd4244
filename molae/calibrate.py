"""Calibration: what each MoE layer's experts see on real text, for activation-aware conversion,
budget allocation and the data-driven baselines (merging, pruning, D²-MoE's Fisher weights).

Shape legend: B windows, T tokens, E experts, D hidden size n, F expert intermediate size m,
K experts per token.

Per MoE layer (keyed by decoder-layer index), accumulated in float64 over all calibration tokens:
  x_gram  [E, D, D]  sum of x x^T over the tokens routed to expert e (its input Gram)
  h_gram  [E, F, F]  sum of h h^T, h = silu(W_gate x) * (W_up x) its intermediate activation
  count   [E]        routed tokens
  reap    [E]        sum over routed tokens of g_e(x) * ||E_e(x)||_2 (REAP's saliency, before / count)
  out_sum [E, D]     sum over all tokens (routed or not) of E_e(x) (HC-SMoE's expert outputs); out_tokens
  fisher  [E]        sum of squared gradients of the LM loss over the expert's weights (with fisher=True)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from .command import progress_bar

from .evaluate import load
from .models import find_experts, layer_index, use_standard_experts

def calibration_ids(source, tokenizer, n_tokens: int, seq_len: int = 512, seed: int = 0,
                    model_vocab: int | None = None) -> torch.Tensor:
    """[B, seq_len] token windows, B = ceil(n_tokens / seq_len). `source`: a prepared data directory
    (`molae data prepare`; windows at seeded random offsets of its training split; its vocabulary must
    fit the model's, `model_vocab`), a text file, or a directory of text files (sorted, read until
    enough text, tokenized with `tokenizer`)."""
    from .data import TokenData, is_prepared, text_files, tokenize_files

    n_windows = math.ceil(n_tokens / seq_len)
    if is_prepared(source):
        data = TokenData(source)
        if model_vocab is not None:
            data.check_vocabulary(model_vocab, "--calibration")
        return data.batch(seed, 0, 0, n_windows, seq_len)[:, :seq_len]
    ids = tokenize_files(text_files(source, "--calibration"), tokenizer, n_windows * seq_len)
    if len(ids) < seq_len:
        raise ValueError(f"--calibration {source} holds {len(ids)} tokens: need at least {seq_len} (one window)")
    n_windows = min(n_windows, len(ids) // seq_len)
    return torch.tensor(ids[:n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)


class _LayerStats:
    def __init__(self, E, D, F_, device, outputs: bool):
        f64 = dict(dtype=torch.float64, device=device)
        self.x_gram = torch.zeros(E, D, D, **f64)
        self.h_gram = torch.zeros(E, F_, F_, **f64)
        self.count = torch.zeros(E, **f64)
        self.reap = torch.zeros(E, **f64)
        self.fisher = torch.zeros(E, **f64)
        self.out_sum = torch.zeros(E, D, **f64) if outputs else None
        self.out_tokens = 0

    @torch.no_grad()
    def update(self, experts, x_TD, idx_TK, w_TK):
        W = experts.dense_weights()
        x_TD = x_TD.float()
        for e in range(experts.n_experts):
            tok, slot = torch.where(idx_TK == e)
            g, up, down = (W[k][e].float() for k in ("gate", "up", "down"))
            h_all = None
            if self.out_sum is not None:  # every token through expert e
                h_all = F.silu(x_TD @ g.T) * (x_TD @ up.T)
                self.out_sum[e] += (h_all @ down.T).double().sum(0)
            if tok.numel() == 0:
                continue
            x = x_TD[tok]
            h = h_all[tok] if h_all is not None else F.silu(x @ g.T) * (x @ up.T)
            xd, hd = x.double(), h.double()
            self.x_gram[e] += xd.T @ xd
            self.h_gram[e] += hd.T @ hd
            w = w_TK[tok, slot].double()
            self.count[e] += tok.numel()
            self.reap[e] += (w * (h @ down.T).double().norm(dim=-1)).sum()
        self.out_tokens += x_TD.shape[0]

    def to_dict(self) -> dict:
        d = {k: v.cpu() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        d["out_tokens"] = self.out_tokens
        return d


def collect(model, ids_BT: torch.Tensor, batch_size: int = 8, outputs: bool = False, fisher: bool = False,
            progress: bool = True) -> dict[int, dict]:
    """Run the calibration windows through `model` (its experts replaced, in place, by our standard
    `Experts` with the same weights) and return {layer: stats} as the module docstring lists.
    outputs: also HC-SMoE's mean outputs (every expert on every token: E times the expert compute).
    fisher: also backpropagate the LM loss for D²-MoE's Fisher weights (expert weights only)."""
    use_standard_experts(model)
    device = next(model.parameters()).device
    found = find_experts(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no MoE experts: calibration needs an MoE model")
    stats, hooks = {}, []
    for name, experts in found:
        i = layer_index(name)
        stats[i] = _LayerStats(experts.n_experts, experts.dim, experts.inter, device, outputs)
        hooks.append(experts.register_forward_hook(  # the call may pass its three inputs by name
            lambda mod, args, kwargs, out, s=stats[i]: s.update(mod, *args, *kwargs.values()), with_kwargs=True))
    for p in model.parameters():
        p.requires_grad_(False)
    if fisher:
        for _, experts in found:
            for p in experts.parameters():
                p.requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        for b in progress_bar(range(0, len(ids_BT), batch_size), desc="calibrate", unit="batch", disable=not progress):
            x = ids_BT[b:b + batch_size].to(device)
            with torch.set_grad_enabled(fisher):
                logits = model(input_ids=x).logits
                if fisher:
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
                    loss.backward()
            if fisher:
                for name, experts in found:
                    s = stats[layer_index(name)]
                    for p in experts.parameters():
                        s.fisher += p.grad.double().square().flatten(1).sum(1)
                        p.grad = None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {i: s.to_dict() for i, s in stats.items()}


def calibrate(src: Path, source, n_tokens: int, seq_len: int = 512, device="cpu", outputs=False, fisher=False,
              batch_size: int = 8) -> dict[int, dict]:
    """Load the model at `src`, draw calibration windows from `source`, collect the statistics."""
    from .data import is_prepared

    model, tok = load(str(src), device, "float32", need_tokenizer=False)
    if tok is None and not is_prepared(source):
        raise ValueError(f"{src} has no tokenizer to read --calibration {source} with: pass a prepared data directory")
    ids = calibration_ids(source, tok, n_tokens, seq_len, model_vocab=model.get_input_embeddings().num_embeddings)
    stats = collect(model, ids, batch_size, outputs=outputs, fisher=fisher)
    del model
    return stats


__all__ = ["calibration_ids", "collect", "calibrate"]
