"""The two-step conversion of MOLAE.md §3: rank reduction, then one shared latent per group.

Shape legend: E experts (of one group, unless said), M rows m of one expert matrix,
N columns n, L latent size d, G groups.

For gate/up, W_i [m, n] = A_i [m, d] @ B [d, n]: stack the group's matrices by rows,
M = [W_1; W_2; ...] (E*m x n), SVD M = U S V^T, B = V_d^T, A_i = W_i V_d. This is the exact
minimiser of sum_i ||W_i - A_i B||_F^2, with minimum sum_{j>d} S_j^2 (Eckart-Young).
For down, W_i [n, m] = B [n, d] @ A_i [d, m] is the same problem on the transposes.
"""

from __future__ import annotations

import math

import torch

from .layers import KINDS, Experts, MoE, MoLAE, MoLAEConfig, check_groups, check_latent_dim, check_projections


def _check_finite(W, name="W"):
    bad = (~torch.isfinite(W)).sum().item()
    if bad:
        raise ValueError(f"{name} has {bad} NaN/Inf values of {W.numel()}: allowed finite weights only")


def _check_rank_ratio(rank_ratio):
    if rank_ratio is not None and not (isinstance(rank_ratio, (int, float)) and 0 < rank_ratio <= 1):
        raise ValueError(f"rank_ratio={rank_ratio!r} is out of range: allowed 0 < rank_ratio <= 1 (or None)")


def _compute_dtype(W, dtype):
    if dtype is None:
        return torch.float64 if W.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype} is not allowed: factorize in torch.float32 or torch.float64")
    return dtype


def rank_reduce(W_EMN: torch.Tensor, rank_ratio: float) -> torch.Tensor:
    """Step 1: each W[i] replaced by its best rank-ceil(rank_ratio * min(m, n)) approximation."""
    _check_rank_ratio(rank_ratio)
    r = math.ceil(rank_ratio * min(W_EMN.shape[-2:]))
    U, S, Vh = torch.linalg.svd(W_EMN, full_matrices=False)
    return (U[..., :r] * S[..., None, :r]) @ Vh[..., :r, :]


def right_singular(M_RN: torch.Tensor, method: str = "auto"):
    """Singular values S (descending) and right singular vectors Vh [.., N] of M [R, N].

    "svd": a thin SVD. "gram": eigenvectors of M^T M accumulated in float64 over row chunks,
    never holding more than one chunk in float64; for tall stacks (R >> N, e.g. DeepSeek-V3's
    256 experts * 2048 rows by 7168) it is far faster and lighter, and float64 keeps the
    eigenvalues (S^2) accurate to ~1e-16 of the largest. "auto": gram when R >= 4N.
    """
    R, N = M_RN.shape
    if method == "auto":
        method = "gram" if R >= 4 * N else "svd"
    if method == "svd":
        _, S, Vh = torch.linalg.svd(M_RN, full_matrices=False)
        return S, Vh
    if method != "gram":
        raise ValueError(f"method={method!r} is not known: allowed 'auto', 'svd' or 'gram'")
    gram_NN = torch.zeros(N, N, dtype=torch.float64, device=M_RN.device)
    chunk = max(1, 2**27 // N)  # about 1 GB of float64 rows at a time
    for i in range(0, R, chunk):
        rows = M_RN[i:i + chunk].double()
        gram_NN.addmm_(rows.T, rows)
    evals, evecs = torch.linalg.eigh(gram_NN)  # ascending
    S = evals.flip(0).clamp_min(0).sqrt()[:min(R, N)]
    Vh = evecs.flip(1).T[:min(R, N)]
    return S.to(M_RN.dtype), Vh.to(M_RN.dtype)


def shared_latent_svd(W_EMN, d, rank_ratio=None, *, dtype=None, method="auto"):
    """Steps 1 and 2 for one group and kind. Returns A [E, m, d], B [d, n] (compute dtype) and the
    singular values S of the row-stacked (rank-reduced) matrix, so that the error of step 2
    is sqrt(sum_{j>d} S_j^2)."""
    if W_EMN.dim() != 3:
        raise ValueError(f"W has shape {tuple(W_EMN.shape)}: expected [experts, m, n]")
    E, M, N = W_EMN.shape
    check_latent_dim(d, E * M, N, name="d")
    _check_rank_ratio(rank_ratio)
    _check_finite(W_EMN)
    W = W_EMN.to(_compute_dtype(W_EMN, dtype))
    if rank_ratio is not None:
        W = rank_reduce(W, rank_ratio)
    S, Vh = right_singular(W.reshape(E * M, N), method)
    B_LN = Vh[:d].contiguous()  # orthonormal rows
    A_EML = W @ B_LN.T  # A_i = W_i V_d
    return A_EML, B_LN, S


def shared_latent(W_EMN: torch.Tensor, d: int, rank_ratio: float | None = None, *, dtype=None, method="auto"):
    """Factor the experts of one group, W [E, m, n], as W[i] ~ A[i] @ B with A [E, m, d], B [d, n].

    Step 1 (when rank_ratio is given) reduces each W[i] to rank ceil(rank_ratio * min(m, n));
    step 2 takes the SVD of the row-stacked matrix. Computed in float32 (float64 for float64
    input, or as `dtype` says) on W's device; returned in W's dtype.
    """
    A, B, _ = shared_latent_svd(W_EMN, d, rank_ratio, dtype=dtype, method=method)
    return A.to(W_EMN.dtype), B.to(W_EMN.dtype)


def factorize_kind(W, kind: str, d: int, rank_ratio=None, *, dtype=None):
    """One group's experts of one projection kind: gate/up W [E, m, n] -> A [E, m, d], B [d, n];
    down W [E, n, m] -> B [n, d], A [E, d, m] with W[i] ~ B @ A[i] (the same problem, transposed).
    Returns (A, B, S) in the compute dtype; S the stacked matrix's singular values."""
    if kind == "down":
        A, B, S = shared_latent_svd(W.transpose(-2, -1), d, rank_ratio, dtype=dtype)
        return A.transpose(-2, -1), B.T, S
    return shared_latent_svd(W, d, rank_ratio, dtype=dtype)


def factorize_projection(W: torch.Tensor, kind: str, d: int | None, groups: int = 1,
                         rank_ratio: float | None = None, *, dtype=None):
    """One projection kind of all experts, W [E, F, D] (gate, up) or [E, D, F] (down), factorized
    per group with latent size d (None: kept whole). Returns (params, row): `Experts` parameter
    name -> tensor (W's dtype), and the report row (see `factorize_experts`)."""
    E = W.shape[0]
    check_groups(groups, E)
    before = W.numel()
    if d is None:
        return {f"{kind}_proj": W}, dict(kind=kind, latent_dim=None, groups=groups, rel_error=0.0, energy_kept=1.0,
                                         params_before=before, params_after=before)
    Eg = E // groups
    rows, cols = (W.shape[2], W.shape[1]) if kind == "down" else (W.shape[1], W.shape[2])
    check_latent_dim(d, Eg * rows, cols, name=f"latent_dim[{kind}]")
    As, Bs, err2, kept2, total2 = [], [], 0.0, 0.0, 0.0
    for g in range(groups):
        W_g = W[g * Eg:(g + 1) * Eg]
        A, B, S = factorize_kind(W_g, kind, d, rank_ratio, dtype=dtype)
        for i in range(0, Eg, 8):  # the error against the originals, a few experts at a time
            W_c = W_g[i:i + 8].to(A.dtype)
            W_hat = B @ A[i:i + 8] if kind == "down" else A[i:i + 8] @ B
            err2 += (W_c - W_hat).square().sum().item()
            total2 += W_c.square().sum().item()
        kept2 += S[:d].double().square().sum().item()
        As.append(A.to(W.dtype))
        Bs.append(B.to(W.dtype))
    params = {f"{kind}_A": torch.cat(As), f"{kind}_B": torch.stack(Bs)}
    total2 = max(total2, torch.finfo(torch.float64).tiny)
    return params, dict(kind=kind, latent_dim=d, groups=groups, rel_error=math.sqrt(err2 / total2),
                        energy_kept=kept2 / total2, params_before=before,
                        params_after=sum(t.numel() for t in params.values()))


def factorize_experts(weights: dict[str, torch.Tensor], latent: dict[str, int], groups: int = 1,
                      rank_ratio: float | None = None, *, dtype=None):
    """Factorize stacked expert weights {kind: [E, F, D] (gate, up) or [E, D, F] (down)}.

    Returns (params, report): `params` maps `Experts` parameter names to tensors (in the
    weights' dtype); `report` has one row per kind: latent size, relative Frobenius error of
    the factorized weights against the originals, share of the originals' energy kept
    (||A B||^2 / ||W||^2 = sum_{j<=d} S_j^2 / ||W||^2), parameters before and after.
    """
    E, F_, D = weights["gate"].shape
    check_groups(groups, E)
    latent = {k: latent[k] for k in check_projections(list(latent))}
    params, report = {}, []
    for kind in KINDS:
        expected = (E, D, F_) if kind == "down" else (E, F_, D)
        if tuple(weights[kind].shape) != expected:
            raise ValueError(f"weights[{kind!r}] has shape {tuple(weights[kind].shape)}: expected {expected}")
        p, row = factorize_projection(weights[kind], kind, latent.get(kind), groups, rank_ratio, dtype=dtype)
        params.update(p)
        report.append(row)
    return params, report


def latent_experts(weights: dict[str, torch.Tensor], latent: dict[str, int], groups: int = 1,
                   rank_ratio: float | None = None, *, dtype=None):
    """A MoLAE `Experts` module (and the error report) from stacked standard expert weights."""
    E, F_, D = weights["gate"].shape
    params, report = factorize_experts(weights, latent, groups, rank_ratio, dtype=dtype)
    ref = weights["gate"]
    experts = Experts(D, F_, E, latent, groups).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            p.copy_(params[name])
    return experts, report


def convert_moe(moe: MoE, latent_dim=None, groups: int = 1, projections=("up", "gate"),
                rank_ratio: float | None = None, *, dtype=None):
    """Convert a standard `MoE` layer into a `MoLAE` layer with the same router and shared expert.

    latent_dim: int, {kind: int}, or None (d = m). Returns (molae, report) as `factorize_experts`.
    """
    if moe.experts.latent:
        raise ValueError("moe already has latent experts: convert a standard MoE layer")
    cfg = MoLAEConfig.from_moe(moe.cfg, groups=groups, latent_dim=latent_dim, projections=projections)
    ref = moe.experts.gate_proj
    with torch.no_grad():
        experts, report = latent_experts(moe.experts.dense_weights(), cfg.latent_dims(), groups, rank_ratio,
                                         dtype=dtype)
    molae = MoLAE(cfg).to(device=ref.device, dtype=ref.dtype)
    molae.experts = experts
    non_expert = {k: v for k, v in moe.state_dict().items() if not k.startswith("experts.")}
    missing, unexpected = molae.load_state_dict(non_expert, strict=False)
    assert not unexpected and all(k.startswith("experts.") for k in missing), (missing, unexpected)
    molae.impl = moe.impl
    return molae, report


__all__ = [
    "rank_reduce",
    "shared_latent",
    "shared_latent_svd",
    "right_singular",
    "factorize_kind",
    "factorize_projection",
    "factorize_experts",
    "latent_experts",
    "convert_moe",
]
