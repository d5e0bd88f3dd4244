"""Per-expert low-rank baselines: truncated SVD, and D²-MoE (Gu et al. 2025, "Delta Decompression for
MoE-based LLMs Compression").

Shape legend: E experts, M rows, N columns (input size) of one expert matrix, R rank. Gate/up are
[m, n] with input n, down [n, m] with input m: either way the input is the last dimension, so with
calibration Grams C_i [N, N] the output error ||(W_i - W_hat_i) X_i||_F is ||(W_i - W_hat_i) S_i||_F
with C_i = S_i S_i^T (SVD-LLM's truncation-aware whitening).
"""

from __future__ import annotations

import torch

from ..factorize import best_rank, whiten


def svd_rank(fraction: float, E: int, M: int, N: int, base: bool = False) -> int:
    """Rank per expert so that E rank-R factors (R (M + N) each), plus one whole base matrix when
    `base` (D²-MoE), fit in fraction * E * M * N parameters."""
    budget = fraction * E * M * N - (M * N if base else 0)
    r = int(budget // (E * (M + N)))
    if r < 1:
        raise ValueError(f"--budget {fraction} leaves no rank for {E} experts of {M}x{N}"
                         f"{' plus a shared base' if base else ''}: raise --budget")
    return min(r, min(M, N))


def truncated(W_EMN: torch.Tensor, r: int, gram_ENN: torch.Tensor | None = None, damp: float = 0.01):
    """Each W_i's best rank-r approximation, in the output-error norm when Grams are given. float64."""
    if gram_ENN is None:
        return best_rank(W_EMN.double(), r)
    S_ENN = whiten(gram_ENN, damp)
    low = best_rank(W_EMN.double() @ S_ENN, r)  # the best rank-r W_hat S, then W_hat = (W_hat S) S^-1
    return torch.linalg.solve_triangular(S_ENN.transpose(1, 2), low.transpose(1, 2), upper=True).transpose(1, 2)


def d2moe(W_EMN: torch.Tensor, fraction: float, fisher_E: torch.Tensor | None = None,
          gram_ENN: torch.Tensor | None = None, damp: float = 0.01):
    """D²-MoE for one projection kind: W_i ~ W_base + Delta_i, W_base the Fisher-weighted mean of the
    experts (their summed squared loss gradients; uniform without calibration), Delta_i truncated to
    the rank the budget leaves, whitened by the expert's inputs when Grams are given. The paper also
    prunes the base structurally; here the base stays whole (more parameters go to the deltas).
    Returns (W_hat [E, M, N] float64, stored parameters, rank)."""
    E, M, N = W_EMN.shape
    r = svd_rank(fraction, E, M, N, base=True)
    W = W_EMN.double()
    f = torch.ones(E, dtype=torch.float64) if fisher_E is None else fisher_E.double().cpu().clamp_min(0)
    f = (f / f.sum() if f.sum() > 0 else torch.full_like(f, 1 / E)).to(W.device)
    base_MN = torch.einsum("e,emn->mn", f, W)
    W_hat = base_MN + truncated(W - base_MN, r, gram_ENN, damp)
    return W_hat, M * N + E * r * (M + N), r
