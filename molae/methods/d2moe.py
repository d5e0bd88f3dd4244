"""D²-MoE (Gu et al. 2025, "Delta Decompression for MoE-based LLMs Compression"), following its authors'
Mixtral code (zhy617/D2MoE, model/merge_mixtral.py, merge_method "fisher" with SVD-LLM-whitened deltas):
per projection kind, W_i ~ W_base + Delta_i, W_base the Fisher-weighted mean of the layer's experts,
Delta_i = W_i - W_base truncated to the rank the budget leaves and whitened by the expert's own inputs
(SVD-LLM, as methods/svd.py) when calibration inputs are given. Stored: the base (m n) and E rank-r deltas.

Deviations, each for a reason:
- Fisher weights. The authors' are per weight entry: squared gradients of the LM loss accumulated over the
  calibration set through the whole model's backward pass, times each expert's routing frequency,
  normalized per entry across experts. The layer-by-layer pipeline holds one layer, so it uses one weight
  per expert, `LayerInputs.fisher`: the squared routed output contribution sum (g_e(x) ||E_e(x)||)^2, the
  squared gradient with respect to the expert's output scale if the gradient reaching the layer's output
  had the same size at every token. Without calibration the weights are uniform. scripts/cpu/peers.sh
  measures the change against the earlier whole-model (per-expert) Fisher of commit 2c1c863.
- The paper also prunes the base structurally (its `pp_ratio`, 0.2 in the Mixtral scripts) and gives the
  saved parameters to the deltas; here the base stays whole and the budget sets the delta rank alone.
- The Gram regularization, the rank rule and the calibration carry are svd.py's (see its deviations).
"""

from __future__ import annotations

import torch

from ..factorize import best_rank, whiten
from ..layers import check_projections
from .base import LayerOutput, Method, dense_rows, register, standard_module
from .svd import svd_rank


def truncated(W_EMN: torch.Tensor, r: int, grams=None, damp: float = 0.01):
    """Each W_i's best rank-r approximation, in the output-error norm when `grams` gives each expert's
    input Gram [N, N] (a tensor [E, N, N], or a function of the expert's index, called one at a time). float64."""
    if grams is None:
        return best_rank(W_EMN.double(), r)
    out = torch.empty_like(W_EMN, dtype=torch.float64)
    for i in range(W_EMN.shape[0]):
        S = whiten(grams[i] if torch.is_tensor(grams) else grams(i), damp)
        low = best_rank(W_EMN[i:i + 1].double() @ S, r)[0]  # the best rank-r W_hat S, then W_hat = (W_hat S) S^-1
        out[i] = torch.linalg.solve_triangular(S.T, low.T, upper=True).T
    return out


def d2moe(W_EMN: torch.Tensor, fraction: float, fisher_E: torch.Tensor | None = None, grams=None,
          damp: float = 0.01):
    """One projection kind. Returns (W_hat [E, M, N] float64, stored parameters, rank)."""
    E, M, N = W_EMN.shape
    r = svd_rank(fraction, E, M, N, base=True)
    W = W_EMN.double()
    f = torch.ones(E, dtype=torch.float64) if fisher_E is None else fisher_E.double().cpu().clamp_min(0)
    f = (f / f.sum() if f.sum() > 0 else torch.full_like(f, 1 / E)).to(W.device)
    base_MN = torch.einsum("e,emn->mn", f, W)
    W_hat = base_MN + truncated(W - base_MN, r, grams, damp)
    return W_hat, M * N + E * r * (M + N), r


class D2MoE(Method):
    name = "d2moe"

    def check(self, opts):
        if opts.budget is None:
            raise ValueError("--method d2moe needs --budget FRACTION (the routed-expert parameters to keep)")

    def convert(self, W, inputs, spec, opts) -> LayerOutput:
        fisher = None if inputs is None else inputs.fisher(W)
        out, stored, info = {}, {}, {}
        if inputs is not None:
            from ..factorize import hidden_mean_gram

            h_mean = hidden_mean_gram(inputs, W)
        for kind in ("gate", "up", "down"):
            if kind not in check_projections(opts.projections):
                out[kind], stored[kind] = W[kind], W[kind].numel()
                continue
            grams = None
            if inputs is not None:  # each expert's regularized input Gram, one at a time
                grams = (lambda e: inputs.hidden_gram(e, W) + inputs.prior * h_mean) if kind == "down" \
                    else inputs.regularized_gram
            W_hat, stored[kind], r = d2moe(W[kind], opts.budget, fisher, grams, opts.damp)
            out[kind], info[kind] = W_hat.to(W[kind].dtype), dict(rank=r)
        return LayerOutput(rows=dense_rows(spec.get("layer"), self.name, W, out, stored, info), dense=out,
                           module=standard_module(out, W["gate"].dtype))


register(D2MoE())

__all__ = ["D2MoE", "d2moe", "truncated"]
