"""Per-expert truncated SVD; with calibration inputs, SVD-LLM (Wang et al. 2025, "SVD-LLM: Truncation-aware
Singular Value Decomposition for LLM Compression") applied to each expert, as its authors' code does it for
a dense linear layer (AIoT-MLSys-Lab/SVD-LLM, SVDLLM.py: `profle_svdllm` and `whitening`):

    C = X^T X over the matrix's own inputs, S = cholesky(C), U Sigma V^T = svd(W S),
    W ~ (U_r Sigma_r) (V_r^T S^-1),   r = floor(m n ratio / (m + n))

i.e. the best rank-r W in the norm of its outputs on the calibration data. Without calibration inputs,
the plain truncated SVD of W. Written as MoLAE experts with one group per expert, so it is exactly MoLAE
with G = E: the same code (methods/molae.py; for one expert its activation-aware solution is the formula
above, B = V_r^T S^-1 and A = U_r Sigma_r), the same file format.

Deviations, each for a reason:
- The matrix's inputs are the tokens routed to that expert (gate and up: the layer's hidden states; down:
  the expert's SwiGLU hidden), as SVD-LLM's per-Linear hooks see them inside an MoE.
- The Gram is regularized before the Cholesky: C_e + prior x (the layer's mean Gram) + damp x mean(diag) I
  (calibrate.LayerInputs.regularized_gram, --damp). SVD-LLM shifts by the smallest eigenvalue only when the
  Cholesky fails; a rarely routed expert sees fewer tokens than n, so its Gram is singular by construction
  and its whitening would fit a handful of tokens.
- The rank is the budget's (budget.rank_per_expert: the same floor, per kind, with the fraction of the
  routed-expert parameters as SVD-LLM's ratio), and A keeps Sigma whole instead of splitting sqrt(Sigma)
  over both factors (the product is the same).
- Calibration inputs come from the layer-by-layer pipeline, the uncompressed model's hidden states by default
  (`--calib-carry original`), as SVD-LLM profiles them.
"""

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
