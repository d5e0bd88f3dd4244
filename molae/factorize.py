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


def _check_finite(W, name="W", chunk: int = 8):
    bad = sum((~torch.isfinite(W[i:i + chunk])).sum().item() for i in range(0, W.shape[0], chunk))
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


def best_rank(W_EMN: torch.Tensor, r: int) -> torch.Tensor:
    """Each W[i]'s best rank-r approximation (Eckart-Young), as the projection onto the top-r eigenvectors
    of its smaller Gram matrix, computed in float64 (batched eigh is far faster than batched SVD on GPUs)."""
    W = W_EMN.double()
    tall = W.shape[-2] > W.shape[-1]
    gram = W.transpose(-2, -1) @ W if tall else W @ W.transpose(-2, -1)
    _, vecs = torch.linalg.eigh(gram)  # ascending
    P = vecs[..., -r:] if r > 0 else vecs[..., :0]
    out = (W @ P) @ P.transpose(-2, -1) if tall else P @ (P.transpose(-2, -1) @ W)
    return out.to(W_EMN.dtype)


def rank_reduce(W_EMN: torch.Tensor, rank_ratio: float) -> torch.Tensor:
    """Step 1: each W[i] replaced by its best rank-ceil(rank_ratio * min(m, n)) approximation."""
    _check_rank_ratio(rank_ratio)
    return best_rank(W_EMN, math.ceil(rank_ratio * min(W_EMN.shape[-2:])))


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
    cdt = _compute_dtype(W_EMN, dtype)
    if method == "auto":
        method = "gram" if E * M >= 4 * N else "svd"
    if method == "gram":  # a few experts at a time: no copy of the stack in the compute dtype or float64
        r = None if rank_ratio is None else math.ceil(rank_ratio * min(M, N))
        gram = torch.zeros(N, N, dtype=torch.float64, device=W_EMN.device)
        for i in range(0, E, 8):
            Wc = W_EMN[i:i + 8].double() if r is None else best_rank(W_EMN[i:i + 8], r).double()
            rows = Wc.reshape(-1, N)
            gram.addmm_(rows.T, rows)
        evals, evecs = _top_eigh(gram)
        S, B_LN = evals[:min(E * M, N)].sqrt().to(cdt), evecs[:, :d].T.contiguous().to(cdt)
        A_EML = torch.empty(E, M, d, dtype=cdt, device=W_EMN.device)
        for i in range(0, E, 8):
            Wc = W_EMN[i:i + 8] if r is None else best_rank(W_EMN[i:i + 8], r)
            A_EML[i:i + 8] = Wc.to(cdt) @ B_LN.T  # A_i = W_i V_d
        return A_EML, B_LN, S
    W = W_EMN.to(cdt)
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


# ----------------------------------------------------------------------------- activation-aware (MOLAE.md §4)
#
# With calibration inputs, the objective is the output error sum_i ||(W_i - W_hat_i) X_i||_F^2, X_i the
# inputs expert i sees (routed tokens; for down, its intermediate activations h). Only the experts'
# Gram matrices C_i = X_i X_i^T [I, I] enter. Whitening: C = S S^T (Cholesky, damped), then
# ||(W - W_hat) X||_F^2 = ||(W - W_hat) S||_F^2 and the problem is the data-free one on W S.
#   down   W_i [n, m] ~ B A_i: stack W_i S_i side by side, B = the top-d left singular vectors,
#          A_i = B^T W_i. Exact minimiser (B has orthonormal columns, so A_i is a projection).
#   gate/up W_i [m, n] ~ A_i B: B is shared, so one whitening serves it: the group's input Gram
#          C_g = sum_i C_i (each routed token once per expert it reaches); B = V_d^T S_g^-1 from the
#          whitened stack [W_i S_g], then each A_i the exact least-squares solution for its own
#          C_i: A_i = W_i C_i B^T (B C_i B^T)^-1.
# Rarely routed experts would have singular C_i: each C_i gets `prior_tokens` tokens' worth of the
# layer's mean input second moment (shrinkage), and every C a damp * mean(diag) ridge.


def regularized_grams(C_EII: torch.Tensor, count_E: torch.Tensor, prior_tokens: float = 64.0) -> torch.Tensor:
    """C_i + prior_tokens * (sum_j C_j / sum_j count_j), float64: no expert's Gram is empty."""
    C = C_EII.double()
    mean_II = C.sum(0) / max(float(count_E.sum()), 1.0)
    return C + prior_tokens * mean_II


def ridged(C_II: torch.Tensor, damp: float) -> torch.Tensor:
    """C + damp * mean(diag C) * I in float64; batched over leading dims."""
    C = C_II.double()
    ridge = damp * C.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    return C + ridge[..., None, None] * torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)


def whiten(C_II: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower-triangular S (float64) with S S^T = C + damp * mean(diag C) * I; batched over leading dims."""
    S, info = torch.linalg.cholesky_ex(ridged(C_II, damp))
    if bool((info != 0).any()):
        raise ValueError(f"calibration Gram matrix is not positive definite with damp={damp}: raise --damp")
    return S


def whitened_stack(W, kind: str, gram=None, damp: float = 0.01):
    """One group's matrices stacked as the rows of one [R, n] matrix whose top right singular vectors
    span the shared latent (float64): gate/up [W_1; W_2; ...] (whitened on the right by the group's
    summed Gram), down [W_1, W_2, ...]^T (each W_i whitened by its own). Returns (stack, S) with S the
    gate/up whitening factor [n, n] (None for down or without Grams)."""
    W = W.double()
    if kind == "down":
        W = W if gram is None else W @ whiten(gram, damp)
        return W.transpose(1, 2).reshape(-1, W.shape[1]), None
    S = None if gram is None else whiten(gram.sum(0), damp)
    return (W if S is None else W @ S).reshape(-1, W.shape[2]), S


def aware_gate_up(W_EMN, d, C_ENN, damp=0.01):
    """Activation-aware shared latent for gate/up. W [E, m, n], C [E, n, n] regularized Grams.
    Returns A [E, m, d], B [d, n] (float64) and the singular values of the whitened stack."""
    W = W_EMN.double()
    stack, S_NN = whitened_stack(W, "up", C_ENN, damp)
    sing, Vh = right_singular(stack)
    B_LN = torch.linalg.solve_triangular(S_NN.T, Vh[:d].T.contiguous(), upper=True).T  # B S = V_d^T
    P_ENL = ridged(C_ENN, damp) @ B_LN.T
    Q_ELL = B_LN @ P_ENL  # B C_i B^T, positive definite
    A_EML = torch.linalg.solve(Q_ELL, (W @ P_ENL).transpose(1, 2)).transpose(1, 2)
    return A_EML, B_LN, sing


def aware_down(W_EDF, d, C_EFF, damp=0.01):
    """Activation-aware shared latent for down. W [E, n, m] (W_i ~ B A_i), C [E, m, m] Grams of h.
    Returns A [E, d, m], B [n, d] (float64) and the singular values of the whitened side-by-side stack."""
    sing, Vh = right_singular(whitened_stack(W_EDF, "down", C_EFF, damp)[0])  # rows: (W_i S_i)^T
    B_DL = Vh[:d].T.contiguous()
    return B_DL.T @ W_EDF.double(), B_DL, sing


def _top_eigh(M_NN: torch.Tensor):
    """Eigenvalues (descending, clamped at 0) and eigenvectors (columns, same order) of a symmetric matrix."""
    evals, evecs = torch.linalg.eigh(M_NN)
    return evals.flip(0).clamp_min(0), evecs.flip(1)


def weight_gram(W_EMN: torch.Tensor, kind: str, chunk: int = 8) -> torch.Tensor:
    """sum_i W_i^T W_i [n, n] (gate/up) or sum_i W_i W_i^T [n, n] (down, W_i [n, m]) in float64, a few
    experts at a time: the stack's Gram without a float64 copy of the stack."""
    n = W_EMN.shape[1] if kind == "down" else W_EMN.shape[2]
    out = torch.zeros(n, n, dtype=torch.float64, device=W_EMN.device)
    for i in range(0, W_EMN.shape[0], chunk):  # one GEMM per chunk of experts: no [chunk, n, n] temporary
        Wc = W_EMN[i:i + chunk].double()
        rows = Wc.transpose(1, 2).reshape(-1, n) if kind == "down" else Wc.reshape(-1, n)
        out.addmm_(rows.T, rows)
    return out


def aware_gate_up_streaming(W_EMN, d: int, inputs, experts, damp: float = 0.01, a_dtype=torch.float64):
    """`aware_gate_up(W, d, C)` with C the regularized Grams of `experts` (ids in `inputs`, a
    `calibrate.LayerInputs`, in W's order), computed from the captured inputs without any [E, n, n]:
    B from the group's summed Gram and the stack's weight Gram (both [n, n]); then for each expert, with
    Z = X_i B^T and Y = X_i W_i^T over its routed rows X_i (and C_mean the layer's mean Gram),
        B C_i' B^T = Z^T Z + prior B C_mean B^T + lam_i B B^T
        W_i C_i' B^T = Y^T Z + prior W_i C_mean B^T + lam_i W_i B^T,  lam_i = damp tr(C_i + prior C_mean) / n.
    Returns A [E, m, d] (in a_dtype: each A_i is solved in float64 and stored, so no float64 stack is held),
    B [d, n] (float64), the whitened stack's singular values, and the output error terms
    (sum_i ||(W_i - A_i B) X_i||^2, sum_i ||W_i X_i||^2) on the unregularized inputs."""
    experts = list(experts)
    n, prior = W_EMN.shape[2], inputs.prior
    C_mean = inputs.mean_gram()
    S_NN = whiten(_group_gram(inputs, experts) + len(experts) * prior * C_mean, damp)
    Gw = weight_gram(W_EMN, "up")
    evals, evecs = _top_eigh(S_NN.T @ Gw @ S_NN)
    B_LN = torch.linalg.solve_triangular(S_NN.T, evecs[:, :d].contiguous(), upper=True).T  # B S = V_d^T
    CmBt_NL = C_mean @ B_LN.T
    BCmB, BB = B_LN @ CmBt_NL, B_LN @ B_LN.T
    tr_mean = C_mean.diagonal().sum()
    A = torch.empty(len(experts), W_EMN.shape[1], d, dtype=a_dtype, device=W_EMN.device)
    err2 = total2 = 0.0
    for j, e in enumerate(experts):
        X = inputs.inputs(e)
        W = W_EMN[j].double()
        Z, Y = X @ B_LN.T, X @ W.T
        lam = damp * (X.square().sum() + prior * tr_mean).clamp_min(1e-30) / n
        Q = Z.T @ Z + prior * BCmB + lam * BB
        R = Y.T @ Z + prior * (W @ CmBt_NL) + lam * (W @ B_LN.T)
        A_j = torch.linalg.solve(Q, R.T).T
        A[j] = A_j
        err2 += (Y - Z @ A_j.T).square().sum().item()
        total2 += Y.square().sum().item()
    return A, B_LN, evals.sqrt(), (err2, total2)


def _group_gram(inputs, experts: list[int]) -> torch.Tensor:
    """sum of the group's input Grams: one weighted pass over all tokens for a large group, the
    experts' own rows for a small one (each token counted once per expert of the group it reaches)."""
    if len(experts) * inputs.idx_TK.shape[1] >= inputs.E:
        return inputs.group_gram(experts)
    return sum(inputs.gram(e) for e in experts)


def down_whitened_gram(W_EDF, inputs, experts, W_layer, h_mean_FF, damp: float = 0.01):
    """sum_i W_i C_i' W_i^T [n, n] for down (W_i [n, m], C_i' = ridged(C^h_i + prior C^h_mean)): its
    eigenvectors are the whitened side-by-side stack's left singular vectors. h of each expert is
    computed from its routed inputs and the layer's gate/up weights `W_layer` (ids in `inputs`)."""
    prior, m = inputs.prior, W_EDF.shape[2]
    out = torch.zeros(W_EDF.shape[1], W_EDF.shape[1], dtype=torch.float64, device=W_EDF.device)
    for j, e in enumerate(experts):
        W = W_EDF[j].double()
        Ch = inputs.hidden_gram(e, W_layer) + prior * h_mean_FF
        lam = damp * Ch.diagonal().sum().clamp_min(1e-30) / m
        out += W @ Ch @ W.T + lam * (W @ W.T)
    return out


def aware_down_streaming(W_EDF, d: int, inputs, experts, W_layer, h_mean_FF, damp: float = 0.01,
                         a_dtype=torch.float64):
    """`aware_down(W, d, C)` with C the regularized Grams of the experts' intermediate activations,
    from the captured inputs: B = the top-d eigenvectors of sum_i W_i C_i' W_i^T ([n, n]), A_i = B^T W_i.
    Returns A [E, d, m], B [n, d] (float64), the singular values, and the output error terms on the
    unregularized activations."""
    experts = list(experts)
    evals, evecs = _top_eigh(down_whitened_gram(W_EDF, inputs, experts, W_layer, h_mean_FF, damp))
    B_DL = evecs[:, :d].contiguous()
    A = torch.empty(len(experts), d, W_EDF.shape[2], dtype=a_dtype, device=W_EDF.device)
    err2 = total2 = 0.0
    for j, e in enumerate(experts):
        W = W_EDF[j].double()
        A_j = B_DL.T @ W
        A[j] = A_j
        h = inputs.hidden(e, W_layer)
        Y = h @ W.T
        err2 += (Y - (h @ A_j.T) @ B_DL.T).square().sum().item()
        total2 += Y.square().sum().item()
    return A, B_DL, evals.sqrt(), (err2, total2)


def hidden_mean_gram(inputs, W_layer) -> torch.Tensor:
    """C^h_mean [m, m]: the layer's mean second moment of intermediate activations per routed slot."""
    total = sum(inputs.hidden_gram(e, W_layer) for e in range(inputs.E))
    return total / max(float(inputs.count.sum()), 1.0)


def output_error(W, W_hat, C_EII):
    """(sum_i ||(W_i - W_hat_i) X_i||^2, sum_i ||W_i X_i||^2) from the Grams C_i (float64)."""
    R, W, C = W.double() - W_hat.double(), W.double(), C_EII.double()
    return (R @ C * R).sum().item(), (W @ C * W).sum().item()  # ||R X||^2 = tr(R C R^T), any kind


def factorize_kind(W, kind: str, d: int, rank_ratio=None, *, dtype=None, gram=None, damp: float = 0.01):
    """One group's experts of one projection kind: gate/up W [E, m, n] -> A [E, m, d], B [d, n];
    down W [E, n, m] -> B [n, d], A [E, d, m] with W[i] ~ B @ A[i] (the same problem, transposed).
    gram: the experts' regularized input Grams [E, I, I] for the activation-aware solution (None:
    the paper's data-free one). Returns (A, B, S) in the compute dtype; S the (whitened) stack's
    singular values."""
    if gram is not None:
        if rank_ratio is not None:
            raise ValueError("rank_ratio is the data-free method's step 1: leave it out with calibration data")
        _check_finite(W)
        A, B, S = (aware_down if kind == "down" else aware_gate_up)(W, d, gram, damp)
        dt = _compute_dtype(W, dtype)
        return A.to(dt), B.to(dt), S.to(dt)
    if kind == "down":
        A, B, S = shared_latent_svd(W.transpose(-2, -1), d, rank_ratio, dtype=dtype)
        return A.transpose(-2, -1), B.T, S
    return shared_latent_svd(W, d, rank_ratio, dtype=dtype)


def spectrum(W, kind: str, gram=None, damp: float = 0.01) -> torch.Tensor:
    """Squared singular values (descending, float64) of one group's (whitened) stack: the error of
    latent size d is the sum of those past d (exactly; for aware gate/up, before A's refinement)."""
    S, _ = right_singular(whitened_stack(W, kind, gram, damp)[0])
    return S.square()


# ----------------------------------------------------------------------------- budget allocation


def allocate_latent(items: dict, budget: int, step: int = 1) -> dict:
    """Latent sizes under one parameter budget with the least summed relative error.

    items: {key: dict(sigma2=[R] descending (summed over groups), energy=total, cost=params per unit
    of d, dense=params kept whole, optional scale=what the error is relative to, energy if absent)}. Every key
    gets its first `step` dimensions; then dimensions go, `step` at a time, to the key whose next ones remove
    the most relative error (sigma2_j / scale) per parameter (the greedy order of a fractional knapsack: each
    key's gains fall with j, each dimension costs the same). d stays below dense / cost, so a factorized kind is
    always smaller than a whole one. A key with fewer than 2 * step possible dimensions goes one at a time
    (step = budget.LATENT_ALIGN keeps the fast kernels' alignment without cramping small test models).
    Returns {key: d}. Raises when even the first dimensions do not fit."""
    units = {}
    for key, it in items.items():
        d_max = min(len(it["sigma2"]), (it["dense"] - 1) // it["cost"])
        units[key] = (step if d_max >= 2 * step else 1, d_max)
    floor = sum(it["cost"] * units[key][0] for key, it in items.items())
    if floor > budget:
        raise ValueError(f"--budget leaves {budget:,} routed-expert parameters, below the {floor:,} that the smallest "
                         "latent size needs in every factorized projection: raise --budget or factorize fewer "
                         "projections")
    gains = []
    for key, it in items.items():
        unit, d_max = units[key]
        rel = it["sigma2"][:d_max] / max(it.get("scale", it["energy"]), 1e-300)
        gains += [(float(rel[j * unit:(j + 1) * unit].sum()) / (it["cost"] * unit), key, j)
                  for j in range(1, d_max // unit)]
    gains.sort(key=lambda g: -g[0])
    d = {key: units[key][0] for key in items}
    left = budget - floor
    for _, key, j in gains:
        unit, cost = units[key][0], items[key]["cost"] * units[key][0]
        if cost <= left and d[key] == j * unit:  # take the j-th chunk only after the ones before it
            d[key] += unit
            left -= cost
    return d


def choose_groups(curves: dict, budget: int) -> dict:
    """G per layer, where each layer offers several (--group-choices), under one parameter budget.

    curves: {layer: {G: {kind: item}}}, items as `allocate_latent` takes them (the spectra of that G's group
    stacks and that G's cost per unit of d). A multiple-choice knapsack, solved by its Lagrangian: for a price
    lam per parameter each layer takes the G (and d per kind) with the least sum of relative error + lam * cost;
    lam is bisected to the cheapest price whose choices fit the budget. `allocate_latent` then spends what is
    left over the chosen G's. Returns {layer: G}."""
    def best(items_by_kind: dict, lam: float) -> tuple[float, int]:
        value = cost = 0
        for it in items_by_kind.values():
            d_max = max(1, min(len(it["sigma2"]), (it["dense"] - 1) // it["cost"]))
            left = it["energy"] - torch.cumsum(it["sigma2"][:d_max].double(), 0)  # the error left at each d
            total = left / max(it.get("scale", it["energy"]), 1e-300) + lam * it["cost"] * torch.arange(
                1, d_max + 1, dtype=torch.float64)
            j = int(total.argmin())
            value, cost = value + float(total[j]), cost + it["cost"] * (j + 1)
        return value, cost

    def choose(lam):
        picks, cost = {}, 0
        for layer, opts in curves.items():
            G, (_, c) = min(((G, best(items, lam)) for G, items in opts.items()), key=lambda pick: pick[1][0])
            picks[layer], cost = G, cost + c
        return picks, cost

    lo, hi = 0.0, 1.0
    while choose(hi)[1] > budget and hi < 1e12:  # a price high enough to fit
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if choose(mid)[1] <= budget else (mid, hi)
    return choose(hi)[0]


# ----------------------------------------------------------------------------- grouping by similarity


def gram_cosines(W_ERN: torch.Tensor, chunk_entries: int = 2**28) -> torch.Tensor:
    """[E, E] cosines <W_i^T W_i, W_j^T W_j>_F / (|.| |.|) of the experts' Gram matrices [n, n], a block of
    the Grams' columns at a time (never E x n x n; about chunk_entries floats of them at once), in the
    weights' dtype upcast to float32 at least, accumulated in float64."""
    E, _, N = W_ERN.shape
    dt = torch.float64 if W_ERN.dtype == torch.float64 else torch.float32
    cols = max(1, chunk_entries // (E * N))
    dots = torch.zeros(E, E, dtype=torch.float64, device=W_ERN.device)
    for c in range(0, N, cols):
        G = torch.stack([w.to(dt).T @ w[:, c:c + cols].to(dt) for w in W_ERN]).reshape(E, -1)  # [E, N * cols]
        dots += (G @ G.T).double()
    norm = dots.diagonal().clamp_min(1e-300).sqrt()
    return (dots / norm[:, None] / norm[None, :]).cpu()


def similarity_groups(W_list, groups: int, sweeps: int = 10) -> torch.Tensor:
    """Equal groups of experts with similar row spaces. W_list: per kind, [E, rows, n] matrices whose
    row spaces (in R^n) should be shared (gate/up as stored, down transposed). Affinity of experts i, j:
    cosine of their Gram matrices, <W_i^T W_i, W_j^T W_j> / (|.| |.|) summed over kinds (`gram_cosines`;
    `group_by_affinity` takes the sum, for a caller that forms one kind's matrices at a time)."""
    return group_by_affinity(sum(gram_cosines(W) for W in W_list), groups, sweeps)


def group_by_affinity(aff: torch.Tensor, groups: int, sweeps: int = 10) -> torch.Tensor:
    """Equal groups from a symmetric affinity [E, E]: greedy seeding (each group grown from the unplaced
    expert least like the rest, by mean affinity to its members), then pairwise swaps while they raise the
    summed within-group affinity (`_swap_sweeps`). Returns perm [E]: group g holds experts
    perm[g*E/G:(g+1)*E/G]."""
    aff = aff.double().cpu()
    E = aff.shape[0]
    check_groups(groups, E)
    Eg = E // groups
    group_of = torch.full((E,), -1, dtype=torch.long)
    for g in range(groups):
        free = (group_of < 0).nonzero().squeeze(1)
        seed = free[aff[free][:, free].sum(1).argmin()]
        members = [int(seed)]
        group_of[seed] = g
        for _ in range(Eg - 1):
            free = (group_of < 0).nonzero().squeeze(1)
            best = free[aff[free][:, members].mean(1).argmax()]
            members.append(int(best))
            group_of[best] = g
    _swap_sweeps(aff, group_of, groups, sweeps)
    return torch.argsort(group_of, stable=True)


def _swap_sweeps(aff: torch.Tensor, group_of: torch.Tensor, groups: int, sweeps: int):
    """In place: for i = 0..E-1, swap i with the next j > i of another group whose swap raises the summed
    within-group affinity, and go on after j; up to `sweeps` passes, until one changes nothing. Each candidate
    j's gain is read off S [E, G] (S[x, g]: summed affinity of x to group g's members), kept up to date by each
    swap, so a pass costs O(E^2) arithmetic in E vector steps, not E^2 Python steps (256 experts, random
    affinities, all sweeps: 0.16 s against 17 s pairwise on a 2-core CPU)."""
    E = aff.shape[0]
    S = aff @ torch.nn.functional.one_hot(group_of, groups).double()
    diag = aff.diagonal()
    for _ in range(sweeps):
        improved = False
        for i in range(E):
            j0 = i + 1
            while j0 < E:
                gi, js = int(group_of[i]), torch.arange(j0, E)
                gj = group_of[j0:]
                gain = (S[i, gj] - aff[i, j0:] - S[i, gi] + diag[i] + S[j0:, gi] - aff[j0:, i] - S[js, gj]
                        + diag[j0:])
                hit = ((gain > 1e-12) & (gj != gi)).nonzero()
                if len(hit) == 0:
                    break
                j = j0 + int(hit[0])
                g2 = int(group_of[j])
                S[:, gi] += aff[:, j] - aff[:, i]
                S[:, g2] += aff[:, i] - aff[:, j]
                group_of[i], group_of[j] = g2, gi
                improved, j0 = True, j + 1
        if not improved:
            break


def factorize_projection(W: torch.Tensor, kind: str, d: int | None, groups: int = 1,
                         rank_ratio: float | None = None, *, dtype=None, gram=None, perm=None, damp: float = 0.01):
    """One projection kind of all experts, W [E, F, D] (gate, up) or [E, D, F] (down), factorized
    per group with latent size d (None: kept whole). gram: the experts' regularized input Grams
    [E, I, I] (activation-aware; `regularized_grams`); perm: slot order of the experts (groups by
    similarity; tensors are written in that order). Returns (params, row): `Experts` parameter
    name -> tensor (W's dtype), and the report row (see `factorize_experts`; with gram also the
    relative output error on the calibration inputs)."""
    E = W.shape[0]
    check_groups(groups, E)
    before = W.numel()
    if perm is not None:
        W = W[perm.to(W.device)]
        gram = None if gram is None else gram[perm.to(gram.device)]
    if d is None:
        return {f"{kind}_proj": W}, dict(kind=kind, latent_dim=None, groups=groups, rel_error=0.0, energy_kept=1.0,
                                         params_before=before, params_after=before)
    Eg = E // groups
    rows, cols = (W.shape[2], W.shape[1]) if kind == "down" else (W.shape[1], W.shape[2])
    check_latent_dim(d, Eg * rows, cols, name=f"latent_dim[{kind}]")
    As, Bs, err2, kept2, total2, out_err2, out_total2 = [], [], 0.0, 0.0, 0.0, 0.0, 0.0
    for g in range(groups):
        W_g = W[g * Eg:(g + 1) * Eg]
        gram_g = None if gram is None else gram[g * Eg:(g + 1) * Eg].to(W.device)
        A, B, S = factorize_kind(W_g, kind, d, rank_ratio, dtype=dtype, gram=gram_g, damp=damp)
        for i in range(0, Eg, 8):  # the error against the originals, a few experts at a time
            W_c = W_g[i:i + 8].to(A.dtype)
            W_hat = B @ A[i:i + 8] if kind == "down" else A[i:i + 8] @ B
            err2 += (W_c - W_hat).square().sum().item()
            total2 += W_c.square().sum().item()
            if gram_g is not None:
                e2, t2 = output_error(W_c, W_hat, gram_g[i:i + 8])
                out_err2, out_total2 = out_err2 + e2, out_total2 + t2
        kept2 += S[:d].double().square().sum().item() if gram is None else 0.0
        As.append(A.to(W.dtype))
        Bs.append(B.to(W.dtype))
    params = {f"{kind}_A": torch.cat(As), f"{kind}_B": torch.stack(Bs)}
    total2 = max(total2, torch.finfo(torch.float64).tiny)
    row = dict(kind=kind, latent_dim=d, groups=groups, rel_error=math.sqrt(err2 / total2),
               energy_kept=kept2 / total2 if gram is None else 1 - err2 / total2, params_before=before,
               params_after=sum(t.numel() for t in params.values()))
    if gram is not None:
        row["rel_output_error"] = math.sqrt(out_err2 / max(out_total2, 1e-300))
    return params, row


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
    "best_rank",
    "rank_reduce",
    "shared_latent",
    "shared_latent_svd",
    "right_singular",
    "factorize_kind",
    "regularized_grams",
    "whiten",
    "whitened_stack",
    "aware_gate_up",
    "aware_down",
    "output_error",
    "spectrum",
    "allocate_latent",
    "group_by_affinity",
    "similarity_groups",
    "factorize_projection",
    "factorize_experts",
    "latent_experts",
    "convert_moe",
]
