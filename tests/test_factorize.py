"""The two-step factorization: optimality, the sufficient condition, exactness, monotonicity,
invalid arguments. Reference values come from numpy's SVD, independent of the code under test."""

import math

import numpy as np
import pytest
import torch

from molae.factorize import convert_moe, factorize_experts, factorize_kind, rank_reduce, right_singular, shared_latent
from molae.layers import MoE, MoEConfig


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())  # new inputs every run; the seed is in messages


def stacked_tail(W_EMN: np.ndarray, d: int) -> float:
    s = np.linalg.svd(W_EMN.reshape(-1, W_EMN.shape[-1]), compute_uv=False)
    return float(np.sqrt((s[d:] ** 2).sum()))


def stacked_error(W, A, B) -> float:
    return (W - A @ B).square().sum().sqrt().item()


@pytest.mark.parametrize("method", ["svd", "gram"])
@pytest.mark.parametrize("E,m,n", [(4, 6, 20), (8, 5, 12), (3, 16, 10)])
def test_step2_error_equals_tail_singular_values(E, m, n, method):
    seed = fresh_seed()
    W = torch.randn(E, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for d in range(1, min(E * m, n) + 1):
        A, B = shared_latent(W, d, method=method)
        assert A.shape == (E, m, d) and B.shape == (d, n)
        assert math.isclose(stacked_error(W, A, B), stacked_tail(W.numpy(), d), rel_tol=1e-9, abs_tol=1e-10), (
            seed, d)


def test_no_alternative_factorization_is_better():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    E, m, n, d = 6, 5, 16, 7
    W = torch.randn(E, m, n, dtype=torch.float64, generator=gen)
    A, B = shared_latent(W, d)
    best = stacked_error(W, A, B)
    for _ in range(50):
        # random B with its own optimal A (least squares), and a fully random pair
        B_r = torch.randn(d, n, dtype=torch.float64, generator=gen)
        A_r = W @ torch.linalg.pinv(B_r)
        assert stacked_error(W, A_r, B_r) >= best - 1e-12, seed
        assert stacked_error(W, torch.randn(E, m, d, dtype=torch.float64, generator=gen), B_r) >= best, seed
        # small and large perturbations of the optimum
        for eps in (1e-6, 1e-3, 1e-1):
            dA = eps * torch.randn(A.shape, dtype=torch.float64, generator=gen)
            dB = eps * torch.randn(B.shape, dtype=torch.float64, generator=gen)
            assert stacked_error(W, A + dA, B + dB) >= best - 1e-12, (seed, eps)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_shared_row_space_factorizes_exactly(dtype, tol):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    E, m, n, d = 8, 12, 40, 9
    R = torch.randn(d, n, generator=gen, dtype=torch.float64)  # the shared d-dimensional row space
    W = (torch.randn(E, m, d, generator=gen, dtype=torch.float64) @ R).to(dtype)
    A, B = shared_latent(W, d)
    assert stacked_error(W, A, B) / W.norm().item() < tol, seed
    # one fewer latent dimension cannot be exact
    A1, B1 = shared_latent(W, d - 1)
    assert stacked_error(W, A1, B1) / W.norm().item() > 1e-3, seed


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gram_and_svd_find_the_same_factorization(dtype, tol):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    M = (torch.randn(400, 24, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
         ).to(dtype)  # distinct singular values, so the subspaces are well defined
    S1, V1 = right_singular(M, "svd")
    S2, V2 = right_singular(M, "gram")
    assert right_singular(M, "auto")[0].shape == S2.shape  # tall: auto picks gram
    torch.testing.assert_close(S2, S1, rtol=tol, atol=tol * S1[0].item())
    for d in (1, 5, 12):  # the same projector onto the top-d right singular subspace
        torch.testing.assert_close(V2[:d].T @ V2[:d], V1[:d].T @ V1[:d], rtol=0, atol=tol * 10)


def test_error_falls_monotonically_with_d():
    W = torch.randn(5, 8, 30, dtype=torch.float64)
    errors = [stacked_error(W, *shared_latent(W, d)) for d in range(1, 31)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10 * W.norm().item()


def test_down_projection_reuses_the_transpose():
    E, n, m, d = 4, 20, 6, 10
    W = torch.randn(E, n, m, dtype=torch.float64)
    A, B, S = factorize_kind(W, "down", d)
    assert A.shape == (E, d, m) and B.shape == (n, d)
    assert torch.allclose(B.T @ B, torch.eye(d, dtype=torch.float64), atol=1e-12)  # B_down = U_d
    side_by_side = W.permute(1, 0, 2).reshape(n, E * m)  # [W_1, W_2, ...]
    err = (W - B @ A).square().sum().sqrt().item()
    s = np.linalg.svd(side_by_side.numpy(), compute_uv=False)
    assert math.isclose(err, float(np.sqrt((s[d:] ** 2).sum())), rel_tol=1e-9)
    assert np.allclose(S.numpy(), s)


def test_rank_ratio_reduces_each_expert_first():
    E, m, n = 4, 10, 16
    W = torch.randn(E, m, n, dtype=torch.float64)
    W_r = rank_reduce(W, 0.55)  # ceil(0.55 * 10) = 6
    assert all(torch.linalg.matrix_rank(w).item() == 6 for w in W_r)
    for w, w_r in zip(W, W_r):  # Eckart-Young per expert
        s = np.linalg.svd(w.numpy(), compute_uv=False)
        assert math.isclose((w - w_r).norm().item(), float(np.sqrt((s[6:] ** 2).sum())), rel_tol=1e-9)
    A, B = shared_latent(W, 16, rank_ratio=0.55)  # full latent: exactly the rank-reduced experts
    assert torch.allclose(A @ B, W_r, atol=1e-10)
    A1, B1 = shared_latent(W, 12, rank_ratio=1.0)
    A2, B2 = shared_latent(W, 12)
    assert torch.allclose(A1 @ B1, A2 @ B2, atol=1e-10)


def test_low_precision_input_is_factorized_in_float32():
    W = torch.randn(4, 8, 32)
    A, B = shared_latent(W.bfloat16(), 12)
    assert A.dtype == B.dtype == torch.bfloat16
    A32, B32 = shared_latent(W.bfloat16().float(), 12)
    assert torch.allclose((A @ B).float(), A32 @ B32, atol=0.05)


def moe_layer(E=8, m=6, n=16, shared=0, router="softmax", seed=0):
    torch.manual_seed(seed)
    return MoE(MoEConfig(n, m, E, 2, router=router, shared_inter=shared, shared_gate=bool(shared))).double()


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("projections", [("up", "gate"), ("up", "gate", "down"), ("down",)])
def test_full_latent_size_reproduces_the_layer(groups, projections):
    moe = moe_layer(shared=12, router="sigmoid" if groups == 2 else "softmax")
    d = min(8 // groups * 6, 16)
    molae, report = convert_moe(moe, latent_dim=d, groups=groups, projections=projections)
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    torch.testing.assert_close(molae(x)[0], moe(x)[0])
    assert all(r["rel_error"] < 1e-12 for r in report)


def test_one_expert_per_group_with_d_equal_m_is_exact():
    moe = moe_layer(E=8, m=6, n=16)
    molae, report = convert_moe(moe, latent_dim=6, groups=8, projections=("up", "gate", "down"))
    x = torch.randn(40, 16, dtype=torch.float64)
    torch.testing.assert_close(molae(x)[0], moe(x)[0])


def test_one_expert_per_group_is_per_expert_truncated_svd():
    moe = moe_layer(E=4, m=8, n=16)
    r = 3
    _, report = convert_moe(moe, latent_dim=r, groups=4, projections=("gate",))
    W = moe.experts.gate_proj.detach().numpy()
    tails = [np.linalg.svd(w, compute_uv=False)[r:] for w in W]
    expected = math.sqrt(sum((t ** 2).sum() for t in tails) / (W ** 2).sum())
    assert math.isclose(report[0]["rel_error"], expected, rel_tol=1e-9)


def test_report_figures_against_numpy():
    moe = moe_layer(E=8, m=6, n=16)
    d, G = 5, 2
    _, report = convert_moe(moe, latent_dim=d, groups=G, projections=("up", "down"))
    rows = {r["kind"]: r for r in report}
    W = moe.experts.up_proj.detach().numpy()
    kept = total = err2 = 0.0
    for g in range(G):
        s = np.linalg.svd(W[g * 4:(g + 1) * 4].reshape(-1, 16), compute_uv=False)
        kept, total, err2 = kept + (s[:d] ** 2).sum(), total + (s ** 2).sum(), err2 + (s[d:] ** 2).sum()
    assert math.isclose(rows["up"]["energy_kept"], kept / total, rel_tol=1e-9)
    assert math.isclose(rows["up"]["rel_error"], math.sqrt(err2 / total), rel_tol=1e-9)
    assert rows["up"]["params_before"] == 8 * 6 * 16
    assert rows["up"]["params_after"] == G * d * 16 + 8 * 6 * d
    assert rows["down"]["params_after"] == G * 16 * d + 8 * d * 6
    assert rows["gate"] == dict(kind="gate", latent_dim=None, groups=G, rel_error=0.0, energy_kept=1.0,
                                params_before=8 * 6 * 16, params_after=8 * 6 * 16)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(d=0), r"d=0 is out of range: allowed 1 <= d <= min\(experts_per_group\*m, n\) = min\(24, 10\) = 10"),
    (dict(d=11), r"d=11 is out of range"),
    (dict(d=-3), r"d=-3 is out of range"),
    (dict(d=4, rank_ratio=0.0), r"rank_ratio=0.0 is out of range: allowed 0 < rank_ratio <= 1"),
    (dict(d=4, rank_ratio=1.5), r"rank_ratio=1.5 is out of range"),
])
def test_invalid_arguments_raise_value_error(kwargs, pattern):
    W = torch.randn(4, 6, 10)
    d = kwargs.pop("d")
    with pytest.raises(ValueError, match=pattern):
        shared_latent(W, d, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise_value_error(bad):
    W = torch.randn(4, 6, 10)
    W[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"W has 1 NaN/Inf values of 240: allowed finite weights only"):
        shared_latent(W, 4)


def test_groups_must_divide_experts():
    moe = moe_layer(E=8)
    with pytest.raises(ValueError, match=r"groups=3 does not divide n_experts=8: allowed \[1, 2, 4, 8\]"):
        convert_moe(moe, latent_dim=4, groups=3)
    w = moe.experts.dense_weights()
    with pytest.raises(ValueError, match=r"latent_dim\[up\]=7 is out of range: .* min\(6, 16\) = 6"):
        factorize_experts(w, {"up": 7}, groups=8)
    with pytest.raises(ValueError, match=r"projections=\['up', 'side'\] is not valid"):
        convert_moe(moe, latent_dim=4, projections=("up", "side"))


def test_choose_groups_gives_each_layer_the_grouping_that_fits_it():
    """Layer a's experts share nothing (G = 4 holds all its energy in 4 dimensions, G = 1 needs 16); layer b's
    share one direction (G = 1 holds it all in one): under a budget that fits both best choices, each gets its own."""
    from molae.factorize import allocate_latent, choose_groups

    def item(s2, cost):
        s2 = torch.tensor(s2, dtype=torch.float64)
        return dict(sigma2=s2, energy=float(s2.sum()), dense=10**6, cost=cost)

    flat, four, one = [1.0] * 16, [4.0] * 4 + [0.0] * 12, [16.0] + [0.0] * 15
    curves = {"a": {1: {"up": item(flat, 10)}, 4: {"up": item(four, 13)}},
              "b": {1: {"up": item(one, 10)}, 4: {"up": item([4.0] * 4 + [0.0] * 12, 13)}}}
    assert choose_groups(curves, 4 * 13 + 10 + 5) == {"a": 4, "b": 1}
    picked = {("a", "up"): curves["a"][4]["up"], ("b", "up"): curves["b"][1]["up"]}
    assert allocate_latent(picked, 4 * 13 + 10 + 5) == {("a", "up"): 4, ("b", "up"): 1}
    assert choose_groups({"a": {1: {"up": item(flat, 10)}}}, 100) == {"a": 1}  # one choice: that one


def test_choose_groups_measures_the_error_left_against_each_items_scale():
    """With `scale` (convert --error-power) the choice compares (energy - kept) / scale: absolute errors (scale 1)
    pick the grouping that leaves less error, relative ones (scale = energy) the one that leaves a smaller share."""
    from molae.factorize import choose_groups

    def item(s2, scale=None):
        s2 = torch.tensor(s2, dtype=torch.float64)
        return dict(sigma2=s2, energy=float(s2.sum()), dense=10**6, cost=10,
                    **({} if scale is None else {"scale": scale}))

    big, small = [50.0, 50.0], [1.0] * 10  # d = 1 leaves 50 of 100 (half) or 9 of 10 (nine tenths)
    assert choose_groups({"a": {1: {"up": item(big)}, 2: {"up": item(small)}}}, 10) == {"a": 1}
    assert choose_groups({"a": {1: {"up": item(big, 1.0)}, 2: {"up": item(small, 1.0)}}}, 10) == {"a": 2}
