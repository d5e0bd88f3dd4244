"""MoBE (Chen et al. 2025, "Mixture-of-Basis-Experts for Compressing MoE-based LLMs"): each expert
matrix W_i [M, N] ~ A_i B_i with A_i [M, R] its own and B_i = sum_j alpha_ij Basis_j a mixture of J
basis matrices [R, N] shared by the layer's experts; fitted by Adam on the reconstruction error
sum_i ||W_i - A_i B_i||_F^2 / sum_i ||W_i||_F^2, as the paper does. Down ([n, m]) is fitted
transposed so that A_i is the smaller side. The start point: experts split into J groups by index,
each group's shared-latent SVD (MOLAE.md §3) as its basis, alpha one-hot. Data-free."""

from __future__ import annotations

import torch

from ..factorize import shared_latent_svd
from ..layers import check_projections
from . import LayerOutput, Method, dense_rows, register, standard_module


def mobe_rank(fraction: float, E: int, M: int, N: int, J: int) -> int:
    r = int((fraction * E * M * N - E * J) // (E * M + J * N))
    if r < 1:
        raise ValueError(f"--budget {fraction} leaves no rank for MoBE with {J} bases: raise --budget")
    return min(r, M, N)


def mobe(W_EMN: torch.Tensor, fraction: float, bases: int | None = None, steps: int = 500, lr: float = 3e-3):
    """Returns (W_hat [E, M, N] float32, stored parameters, info)."""
    E, M, N = W_EMN.shape
    J = bases or max(2, E // 8)
    J = min(J, E)
    r = mobe_rank(fraction, E, M, N, J)
    W = W_EMN.float()
    scale = W.square().mean().sqrt().clamp_min(1e-30)
    W = W / scale
    A = torch.empty(E, M, r, device=W.device)
    basis = torch.empty(J, r, N, device=W.device)
    group = torch.arange(E, device=W.device) % J
    for j in range(J):
        idx = (group == j).nonzero().squeeze(1)
        A_j, B_j, _ = shared_latent_svd(W[idx], r)
        A[idx], basis[j] = A_j.float(), B_j.float()
    alpha = torch.nn.functional.one_hot(group, J).float()
    params = [torch.nn.Parameter(t.clone()) for t in (A, basis, alpha)]
    opt = torch.optim.Adam(params, lr=lr)
    total = W.square().sum()

    def loss_fn():
        A_, basis_, alpha_ = params
        return (W - A_ @ torch.einsum("ej,jrn->ern", alpha_, basis_)).square().sum() / total

    start = loss_fn().item()
    init = [p.detach().clone() for p in params]
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            opt.step()
    with torch.no_grad():
        end = loss_fn().item()
        if not end <= start:  # Adam made it worse (or NaN): keep the start point
            for p, t in zip(params, init):
                p.copy_(t)
            end = start
        A_, basis_, alpha_ = params
        W_hat = (A_ @ torch.einsum("ej,jrn->ern", alpha_, basis_)) * scale
    return W_hat, E * M * r + J * r * N + E * J, dict(rank=r, bases=J, rel_error_start=start ** 0.5,
                                                     rel_error=end ** 0.5)


class MoBE(Method):
    name = "mobe"
    calibration = "none"

    def check(self, opts):
        if opts.budget is None:
            raise ValueError("--method mobe needs --budget FRACTION (the routed-expert parameters to keep)")

    def convert(self, W, inputs, spec, opts) -> LayerOutput:
        out, stored, info = {}, {}, {}
        for kind in ("gate", "up", "down"):
            if kind not in check_projections(opts.projections):
                out[kind], stored[kind] = W[kind], W[kind].numel()
                continue
            fit = W[kind].transpose(1, 2) if kind == "down" else W[kind]
            W_hat, stored[kind], info[kind] = mobe(fit, opts.budget, opts.mobe_bases, opts.mobe_steps)
            out[kind] = (W_hat.transpose(1, 2) if kind == "down" else W_hat).to(W[kind].dtype)
        return LayerOutput(rows=dense_rows(spec.get("layer"), self.name, W, out, stored, info), dense=out,
                           module=standard_module(out, W["gate"].dtype))


register(MoBE())
