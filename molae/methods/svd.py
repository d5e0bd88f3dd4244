"""Per-expert truncated SVD: each expert matrix W_i ~ A_i B_i of rank r, the rank that --budget leaves
(or --latent-dim); with calibration inputs, SVD-LLM's truncation-aware whitening (the best rank-r
approximation in the norm of the expert's own outputs). Written as MoLAE experts with one group per
expert, so it is exactly MoLAE with G = E: the same code, the same file format."""

from __future__ import annotations

from ..budget import rank_per_expert
from ..layers import check_projections
from .base import LayerShape, register
from .molae import MoLAE


def svd_rank(fraction: float, E: int, M: int, N: int, base: bool = False) -> int:
    """Rank per expert so that E rank-R factors, plus one whole base matrix when `base` (D²-MoE), fit in
    fraction * E * M * N parameters (budget.rank_per_expert)."""
    return rank_per_expert(fraction, E, M, N, shared=M * N if base else 0)


class SVD(MoLAE):
    name = "svd"
    allocates = False

    def check(self, opts):
        if opts.budget is None and not opts.latent_dim:
            raise ValueError("--method svd needs --budget FRACTION (or --latent-dim R, the rank per expert)")
        if opts.groups != 1 or opts.group_by != "index":
            raise ValueError("--groups and --group-by are MoLAE options: leave them out with --method svd")

    def groups(self, shape: LayerShape, opts) -> int:
        return shape.experts

    def plan(self, shape: LayerShape, opts) -> dict:
        if opts.budget is None:
            return super().plan(shape, opts)
        r = svd_rank(opts.budget, shape.experts, shape.inter, shape.dim)
        return dict(latent=dict.fromkeys(check_projections(opts.projections), r), groups=shape.experts)


register(SVD())
