"""MoBE (Chen et al. 2025, "Mixture-of-Basis-Experts for Compressing MoE-based LLMs"), as its authors' code
fits it (inclusionAI/MoBE, train.py): per layer and for gate and up separately (down is kept whole),

    W_i ~ A_i silu(sum_j softmax(w_i)_j B_j)     A_i [m, k], B_j [k, n] shared by the layer, w_i [J]

with k = m (`--truncation` = rows_per_matrix: A_i is m x m), J bases (`--num_B`), fitted by Adam at lr 0.07
for 30,000 full-batch steps on the weights divided by their standard deviation (mean squared error), from a
start where the experts are split into J groups by index and each group's stacked SVD gives its basis
(U_k S_k the A_i, V_k^T the basis, w_i one-hot on its own group before the softmax); the parameters kept
are those of the best real (unscaled) error seen at every 200th step. Stored: E m k + J k n + E J a kind.

The budget knob is J, as the authors set it: the most bases (a divisor of E, so that the groups are equal)
that fit the budget with down kept whole. Below the smallest budget the published form reaches (J = 1), or
where m >= n (A_i alone is as large as W_i), `mobe` refuses; `mobe-lowrank` is a labelled variant that reaches
any budget: the same model and fit with k < m chosen by the budget, J = E/4 (the authors' 128 experts to 32
bases), and down fitted too (transposed, so that A_i is the smaller side); `mobe-linear` the same with the
identity for SiLU (an ablation, results/mobe_ablation/).

Deviations: float32 weights (the authors cast to float16 first); --mobe-steps can shorten the fit (default
30,000); nothing else.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..budget import routed_params
from ..layers import check_projections
from .base import LayerOutput, Method, dense_rows, register, standard_module


def divisors(E: int) -> list[int]:
    return [j for j in range(1, E + 1) if E % j == 0]


def mobe_params(E: int, m: int, n: int, J: int, k: int) -> int:
    return E * m * k + J * k * n + E * J


def published_bases(fraction: float, E: int, m: int, n: int) -> int | None:
    """The most bases J (a divisor of E) with gate and up as MoBE (k = m) and down whole within the
    budget; None when not even J = 1 fits."""
    budget = fraction * routed_params(E, m, n) - E * n * m
    fits = [J for J in divisors(E) if 2 * mobe_params(E, m, n, J, m) <= budget]
    return max(fits) if fits else None


def variant_rank(fraction: float, E: int, M: int, N: int, J: int) -> int:
    """k for `mobe-lowrank`: the largest rank with the kind's share of the budget."""
    k = int((fraction * E * M * N - E * J) // (E * M + J * N))
    if k < 1:
        raise ValueError(f"--budget {fraction} leaves no rank for MoBE with {J} bases: raise --budget")
    return min(k, M, N)


def mobe(W_EMN: torch.Tensor, J: int, k: int, steps: int = 30000, lr: float = 0.07, check_every: int = 200,
         act=F.silu):
    """Fit one kind's experts (module notes). Returns (W_hat [E, M, N] float32, stored parameters, info).
    `act`: the nonlinearity on the mixed bases (the authors' SiLU; scripts/cpu/mobe_ablation.py swaps it)."""
    E, M, N = W_EMN.shape
    if E % J:
        raise ValueError(f"MoBE with {J} bases needs them to divide the {E} experts")
    target = W_EMN.float()
    std = target.std().clamp_min(1e-30)
    Eg = E // J
    A = torch.empty(E, M, k, device=target.device)
    B = torch.empty(J, k, N, device=target.device)
    for j in range(J):  # each group's stacked SVD: U_k S_k gives its experts' A, V_k^T its basis
        U, S, Vh = torch.linalg.svd(target[j * Eg:(j + 1) * Eg].reshape(-1, N), full_matrices=False)
        A[j * Eg:(j + 1) * Eg] = (U[:, :k] * S[:k]).reshape(Eg, M, k)
        B[j] = Vh[:k]
    w = F.one_hot(torch.arange(E, device=target.device) // Eg, J).float()
    params = {"A": torch.nn.Parameter(A), "B": torch.nn.Parameter(B), "w": torch.nn.Parameter(w)}

    def reconstruct():
        mix = torch.einsum("ej,jkn->ekn", torch.softmax(params["w"], dim=1), params["B"])
        return params["A"] @ act(mix)  # in units of std

    opt = torch.optim.Adam(params.values(), lr=lr)
    best, best_state = float("inf"), None
    with torch.enable_grad():
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(reconstruct(), target / std)
            loss.backward()
            opt.step()
            if (step + 1) % check_every == 0 or step + 1 == steps:
                with torch.no_grad():
                    real = F.mse_loss(reconstruct() * std, target).item()
                if real < best:
                    best, best_state = real, copy.deepcopy({n: p.detach() for n, p in params.items()})
    with torch.no_grad():
        if best_state is not None:
            for n, p in params.items():
                p.copy_(best_state[n])
        W_hat = reconstruct() * std
        rel = ((W_hat - target).norm() / target.norm().clamp_min(1e-30)).item()
    return W_hat, mobe_params(E, M, N, J, k), dict(bases=J, rank=k, steps=steps, rel_error=rel)


class MoBE(Method):
    name = "mobe"
    calibration = "none"
    act = staticmethod(F.silu)  # on the mixed bases (the authors')

    def check(self, opts):
        if opts.budget is None:
            raise ValueError(f"--method {self.name} needs --budget FRACTION (the routed-expert parameters to keep)")

    def plan(self, shape, opts) -> dict:
        E, m, n = shape.experts, shape.inter, shape.dim
        J = published_bases(opts.budget, E, m, n) if m < n else None
        if J is None:
            floor = (2 * mobe_params(E, m, n, 1, m) + E * n * m) / routed_params(E, m, n)
            raise ValueError(f"layer {shape.layer}: published MoBE (A_i m x m, down kept whole) stores at least "
                             f"{floor:.0%} of the routed-expert parameters here{' (m >= n)' if m >= n else ''}: "
                             f"raise --budget, or use --method mobe-lowrank")
        return dict(bases=J, rank=m, kinds=("gate", "up"))

    def convert(self, W, inputs, spec, opts) -> LayerOutput:
        out, stored, info = {}, {}, {}
        for kind in ("gate", "up", "down"):
            if kind not in spec["kinds"]:
                out[kind], stored[kind] = W[kind], W[kind].numel()
                continue
            fit = W[kind].transpose(1, 2) if kind == "down" else W[kind]  # A_i the smaller side
            rank = spec["rank"] or variant_rank(opts.budget, *fit.shape, spec["bases"])
            W_hat, stored[kind], info[kind] = mobe(fit, spec["bases"], rank, opts.mobe_steps, act=self.act)
            out[kind] = (W_hat.transpose(1, 2) if kind == "down" else W_hat).to(W[kind].dtype)
        return LayerOutput(rows=dense_rows(spec.get("layer"), self.name, W, out, stored, info), dense=out,
                           module=standard_module(out, W["gate"].dtype))


class MoBELowRank(MoBE):
    """The labelled variant below the published form's floor (module notes)."""

    name = "mobe-lowrank"

    def plan(self, shape, opts) -> dict:
        J = max(j for j in divisors(shape.experts) if j <= max(1, shape.experts // 4))
        return dict(bases=J, rank=None, kinds=check_projections(opts.projections))


class MoBELinear(MoBELowRank):
    """`mobe-lowrank` with the identity for SiLU: W_i ~ A_i sum_j softmax(w_i)_j B_j, a shared linear latent of J
    bases that each expert mixes with its own weights (MoLAE's groups are the one-hot case). Not a published
    method: the ablation of results/mobe_ablation/, in perplexity."""

    name = "mobe-linear"
    act = staticmethod(lambda x: x)


register(MoBE())
register(MoBELowRank())
register(MoBELinear())
