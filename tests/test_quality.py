"""[5]: activation-aware factorization, budget allocation, grouping by similarity, the baselines,
calibration statistics, healing and `molae bench quality`, on synthetic matrices and tiny real
transformers models saved to disk."""

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import molae  # noqa: F401  (registers the molae_<family> model types)
from molae import data as D
from molae import methods
from molae.calibrate import LayerInputs, calibration_ids
from molae.checkpoint import SourceCheckpoint
from molae.cli import main
from molae.convert import ConvertOptions, convert_checkpoint, decompress_checkpoint, find_expert_groups
from molae.factorize import (allocate_latent, best_rank, factorize_kind, factorize_projection, output_error,
                             similarity_groups, spectrum)
from molae.methods.d2moe import d2moe, truncated
from molae.methods.hcsmoe import average_linkage
from molae.methods.mobe import mobe
from molae.methods.pruning import keep_experts
from molae.methods.svd import svd_rank
from molae.sequential import LayerRunner
from molae.heal import balance_factors, heal
from molae.layers import Experts
from molae.models import find_experts, use_standard_experts
from molae.bench.quality import uniform_latent
from tiny import tiny_model

STDLIB = Path(sysconfig.get_paths()["stdlib"])
f64 = torch.float64


def anisotropic_grams(E, N, tokens=300, seed=0):
    """Per-expert input Grams of inputs whose coordinates have scales spread over two decades."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, N, dtype=f64)
    X = [torch.randn(N, tokens, generator=g, dtype=f64) * scale[:, None] for _ in range(E)]
    return torch.stack([x @ x.T for x in X]), torch.full((E,), float(tokens), dtype=f64)


# ----------------------------------------------------------------------------- activation-aware


@pytest.mark.parametrize("kind", ["up", "down"])
def test_activation_aware_beats_data_free_on_output_error(kind):
    torch.manual_seed(1)
    E, M, N, d = 6, 12, 20, 8
    W = torch.randn(E, M, N, dtype=f64) if kind == "up" else torch.randn(E, N, M, dtype=f64)
    C, _ = anisotropic_grams(E, N if kind == "up" else M)
    hat = lambda A, B: B @ A if kind == "down" else A @ B  # noqa: E731
    A, B, _ = factorize_kind(W, kind, d, gram=C, damp=1e-10)
    A0, B0, _ = factorize_kind(W, kind, d)
    aware, total = output_error(W, hat(A, B), C)
    free, _ = output_error(W, hat(A0, B0), C)
    assert aware < 0.5 * free < total
    # data-free remains the better solution in plain weight space (it is that problem's optimum)
    assert (W - hat(A0, B0)).norm() <= (W - hat(A, B)).norm() + 1e-9


def test_aware_down_is_the_exact_optimum_and_gate_up_a_optimal_per_expert():
    torch.manual_seed(2)
    E, M, N, d = 5, 10, 16, 6
    Wd = torch.randn(E, N, M, dtype=f64)
    C, _ = anisotropic_grams(E, M)
    A, B, _ = factorize_kind(Wd, "down", d, gram=C, damp=1e-12)
    err, _ = output_error(Wd, B @ A, C)
    assert err == pytest.approx(spectrum(Wd, "down", C, damp=1e-12)[d:].sum().item(), rel=1e-6)
    for _ in range(5):  # no perturbation of the optimum does better
        Bp = torch.linalg.qr(B + 0.05 * torch.randn_like(B))[0]
        assert output_error(Wd, Bp @ (Bp.T @ Wd), C)[0] >= err - 1e-9
    # gate/up: with B fixed, each A_i solves its own least squares: perturbing A cannot help
    Wu = torch.randn(E, M, N, dtype=f64)
    Cu, _ = anisotropic_grams(E, N, seed=3)
    A, B, _ = factorize_kind(Wu, "up", d, gram=Cu, damp=1e-12)
    best, _ = output_error(Wu, A @ B, Cu)
    for _ in range(5):
        assert output_error(Wu, (A + 1e-3 * torch.randn_like(A)) @ B, Cu)[0] > best


def test_aware_with_isotropic_inputs_is_the_data_free_solution_and_full_d_is_exact():
    torch.manual_seed(4)
    E, M, N = 4, 6, 10
    W = torch.randn(E, M, N, dtype=f64)
    eye = torch.eye(N, dtype=f64).expand(E, N, N).clone()
    A, B, S = factorize_kind(W, "gate", 5, gram=eye, damp=0.0)
    A0, B0, S0 = factorize_kind(W, "gate", 5)
    torch.testing.assert_close(A @ B, A0 @ B0)
    A, B, _ = factorize_kind(W, "gate", N, gram=anisotropic_grams(E, N)[0], damp=1e-12)
    torch.testing.assert_close(A @ B, W)


def test_rank_ratio_with_calibration_is_refused():
    W = torch.randn(2, 4, 6, dtype=f64)
    with pytest.raises(ValueError, match="rank_ratio"):
        factorize_kind(W, "up", 3, 0.5, gram=torch.eye(6, dtype=f64).expand(2, 6, 6))


def test_best_rank_matches_truncated_svd():
    W = torch.randn(3, 9, 14, dtype=f64)
    for w in (W, W.transpose(1, 2)):
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(best_rank(w, 4), (U[..., :4] * S[..., None, :4]) @ Vh[..., :4, :])


# ----------------------------------------------------------------------------- budget, grouping


def test_allocation_in_steps_of_the_kernels_alignment():
    """convert allocates latent sizes 8 at a time (budget.LATENT_ALIGN: torch's grouped GEMM takes rows of 16 bytes;
    other sizes run a padded fallback that syncs with the host), nearly as well as one at a time; a key with room for
    fewer than 16 dimensions still goes one at a time."""
    from molae.budget import LATENT_ALIGN

    items, mats = planted_spectra((("fast", 0.95), ("slow", 0.99), ("flat", 1.0)), 8, 64, 256, seed=6)
    items["tiny"] = dict(sigma2=torch.ones(12, dtype=f64), energy=12.0, cost=10, dense=121)  # at most 12 dimensions
    mats["tiny"] = items["tiny"]["sigma2"]
    budget = 3 * 100 * (256 + 512) + 5 * 10

    def rel(dd):
        return sum(mats[k][dd[k]:].sum().item() / items[k]["energy"] for k in dd)

    one, aligned = allocate_latent(items, budget), allocate_latent(items, budget, LATENT_ALIGN)
    assert sum(items[k]["cost"] * aligned[k] for k in aligned) <= budget
    assert all(aligned[k] % LATENT_ALIGN == 0 for k in ("fast", "slow", "flat")) and 1 <= aligned["tiny"] <= 12
    assert aligned["fast"] < aligned["slow"] <= aligned["flat"]
    assert rel(one) <= rel(aligned) <= 1.1 * rel(one)
    assert any(one[k] % LATENT_ALIGN for k in ("fast", "slow", "flat"))  # so the step is what aligned them


def planted_spectra(decays, E: int, M: int, N: int, seed: int) -> tuple[dict, dict]:
    """allocate_latent's items (and each one's sigma2) for stacks whose singular values fall as decay^j."""
    torch.manual_seed(seed)
    items, mats = {}, {}
    for key, decay in decays:
        U = torch.linalg.qr(torch.randn(N, N, dtype=f64))[0]
        W = torch.randn(E, M, N, dtype=f64) @ torch.diag(decay ** torch.arange(N, dtype=f64)) @ U
        s2 = spectrum(W, "up")
        items[key] = dict(sigma2=s2, energy=s2.sum().item(), cost=N + E * M, dense=E * M * N)
        mats[key] = s2
    return items, mats


def test_allocation_meets_the_budget_and_beats_uniform_latent_sizes():
    items, mats = planted_spectra((("fast", 0.5), ("slow", 0.95), ("flat", 1.0)), 8, 8, 32, seed=5)
    budget = 3 * 10 * (32 + 64)
    d = allocate_latent(items, budget)
    assert sum(items[k]["cost"] * d[k] for k in d) <= budget

    def rel(dd):
        return sum(mats[k][dd[k]:].sum().item() / items[k]["energy"] for k in dd)

    assert rel(d) < rel({k: 10 for k in items})
    assert d["fast"] < d["slow"] <= d["flat"]  # fast-decaying spectra need fewer dimensions
    with pytest.raises(ValueError, match="raise --budget"):
        allocate_latent(items, 10)


def test_similarity_groups_recover_planted_groups_and_make_them_exact():
    torch.manual_seed(6)
    E, M, N, d = 8, 4, 24, 4
    bases = [torch.linalg.qr(torch.randn(N, d, dtype=f64))[0].T for _ in range(2)]
    W = torch.stack([torch.randn(M, d, dtype=f64) @ bases[e % 2] for e in range(E)])  # interleaved by index
    perm = similarity_groups([W], 2)
    groups = [set(perm[:4].tolist()), set(perm[4:].tolist())]
    assert {frozenset(g) for g in groups} == {frozenset({0, 2, 4, 6}), frozenset({1, 3, 5, 7})}
    _, row_sim = factorize_projection(W, "up", d, 2, perm=perm)
    _, row_idx = factorize_projection(W, "up", d, 2)
    assert row_sim["rel_error"] < 1e-10 < 0.1 < row_idx["rel_error"]


def _swap_sweeps_reference(aff, group_of, groups, sweeps):
    """The obvious O(E^2)-Python-steps form of factorize._swap_sweeps: every pair's gain summed afresh."""
    E = aff.shape[0]
    for _ in range(sweeps):
        improved = False
        for i in range(E):
            for j in range(i + 1, E):
                gi, gj = group_of[i].item(), group_of[j].item()
                if gi == gj:
                    continue
                in_i, in_j = group_of == gi, group_of == gj
                delta = (aff[i, in_j].sum() - aff[i, j] - aff[i, in_i].sum() + aff[i, i]
                         + aff[j, in_i].sum() - aff[j, i] - aff[j, in_j].sum() + aff[j, j])
                if delta > 1e-12:
                    group_of[i], group_of[j] = gj, gi
                    improved = True
        if not improved:
            break


@pytest.mark.parametrize("E,G,seed", [(8, 2, 0), (24, 4, 1), (48, 6, 2), (64, 16, 3)])
def test_swap_sweeps_match_the_pairwise_reference(E, G, seed):
    from molae.factorize import _swap_sweeps

    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(E, 5, generator=gen, dtype=f64)
    aff = X @ X.T  # symmetric, as gram cosines are
    start = torch.randperm(E, generator=gen) % G
    fast, slow = start.clone(), start.clone()
    _swap_sweeps(aff, fast, G, 10)
    _swap_sweeps_reference(aff, slow, G, 10)
    assert torch.equal(fast, slow) and not torch.equal(fast, start)  # the same swaps, and some were made
    assert torch.equal(torch.bincount(fast, minlength=G), torch.full((G,), E // G))  # groups stay equal


def test_permuted_experts_fast_path_matches_reference_and_router_order():
    torch.manual_seed(7)
    ex = Experts(16, 8, 6, {"gate": 4, "up": 4, "down": 4}, groups=2, permuted=True).double()
    ex.expert_slot.copy_(torch.tensor([3, 0, 5, 1, 4, 2]))
    x = torch.randn(20, 16, dtype=f64)
    idx = torch.stack([torch.randperm(6)[:2] for _ in range(20)])
    w = torch.rand(20, 2, dtype=f64)
    ex.impl = "reference"
    ref = ex(x, idx, w)
    ex.impl = "fast"
    torch.testing.assert_close(ex.forward_fast(x, idx, w, backend="bmm"), ref)
    dense = ex.dense_weights()
    torch.testing.assert_close(dense["gate"][2], ex.expert_weight("gate", 2))


# ----------------------------------------------------------------------------- baselines


def test_svd_and_d2moe_budgets_and_exactness():
    torch.manual_seed(8)
    E, M, N = 4, 8, 12
    r = svd_rank(0.5, E, M, N)
    assert E * r * (M + N) <= 0.5 * E * M * N < E * (r + 1) * (M + N)
    W = torch.randn(E, M, N, dtype=f64)
    torch.testing.assert_close(truncated(W, min(M, N)), W)
    C, _ = anisotropic_grams(E, N)
    assert output_error(W, truncated(W, 3, C, 1e-12), C)[0] < output_error(W, truncated(W, 3), C)[0]
    W_hat, stored, r = d2moe(W, 0.6)
    assert stored <= 0.6 * E * M * N and r >= 1
    same = W[:1].expand(E, M, N).clone()  # identical experts: the base alone is exact
    torch.testing.assert_close(d2moe(same, 0.5)[0], same)
    with pytest.raises(ValueError, match="raise --budget"):
        d2moe(W, 0.01)


def test_mobe_fits_a_planted_mixture_of_bases_and_sets_its_bases_by_the_budget():
    """inclusionAI/MoBE's model on experts built from it: the fit gets far below its SVD start; the
    budget knob is J, the most bases (dividing E) that fit with A_i m x m and down whole."""
    torch.manual_seed(9)
    E, M, N, J = 8, 6, 24, 2
    basis = torch.randn(J, M, N)
    mix = torch.softmax(3 * torch.randn(E, J), dim=1)
    W = torch.randn(E, M, M) @ torch.nn.functional.silu(torch.einsum("ej,jkn->ekn", mix, basis))
    W_hat, stored, info = mobe(W, J, M, steps=3000, lr=0.02)
    _, _, start = mobe(W, J, M, steps=1)
    assert stored == E * M * M + J * M * N + E * J
    assert info["rel_error"] < 0.25 * start["rel_error"]
    assert (W - W_hat).norm() / W.norm() == pytest.approx(info["rel_error"], rel=1e-4)
    from molae.methods.mobe import mobe_params, published_bases

    Jb = published_bases(0.8, 16, 8, 64)
    assert Jb is not None and 16 % Jb == 0
    assert 2 * mobe_params(16, 8, 64, Jb, 8) + 16 * 64 * 8 <= 0.8 * 3 * 16 * 8 * 64
    bigger = min(j for j in (1, 2, 4, 8, 16) if j > Jb) if Jb < 16 else None
    assert bigger is None or 2 * mobe_params(16, 8, 64, bigger, 8) + 16 * 64 * 8 > 0.8 * 3 * 16 * 8 * 64
    assert published_bases(0.4, 16, 8, 64) is None  # below the published form's floor (46% here)


def test_mobe_linear_is_a_shared_latent_of_its_bases_and_mobe_lowrank_is_not():
    """mobe-linear (the SiLU ablated): every expert's rows lie in the span of the J bases' J k rows, one shared
    latent for the layer; with SiLU (mobe-lowrank) the experts leave that span."""
    from molae.methods.base import LayerShape

    torch.manual_seed(10)
    E, M, N = 8, 6, 64
    W = {"gate": torch.randn(E, M, N), "up": torch.randn(E, M, N), "down": torch.randn(E, N, M)}
    ranks = {}
    for name in ("mobe-linear", "mobe-lowrank"):
        method, opts = methods.get(name), ConvertOptions(method=name, budget=0.5, mobe_steps=50)
        spec = dict(method.plan(LayerShape(0, E, M, N, 2), opts), layer=0)
        out = method.convert(W, None, spec, opts)
        info = out.rows[0]["info"]
        span = spec["bases"] * info["rank"]
        assert span < min(E * M, N)  # a bound that can bind
        ranks[name] = (torch.linalg.matrix_rank(out.dense["gate"].reshape(E * M, N).double(), rtol=1e-6).item(), span)
    assert ranks["mobe-linear"][0] <= ranks["mobe-linear"][1] < ranks["mobe-lowrank"][0]


def test_hcsmoe_aligns_neurons_before_merging():
    """Two experts computing the same function with their intermediate neurons permuted merge into it
    exactly (HC-SMoE's fix-dom-same alignment), where averaging the weights as stored does not."""
    from molae.methods.hcsmoe import merge_fix_dom_same

    torch.manual_seed(10)
    m, n = 12, 20
    g, u, d = torch.randn(m, n, dtype=f64), torch.randn(m, n, dtype=f64), torch.randn(n, m, dtype=f64)
    perm = torch.randperm(m)
    W = {"gate": torch.stack([g, g[perm]]), "up": torch.stack([u, u[perm]]), "down": torch.stack([d, d[:, perm]])}
    X = torch.randn(300, n, dtype=f64)
    merged = merge_fix_dom_same(W, [0, 1], X, [0.5, 0.5])
    for k in ("gate", "up", "down"):
        torch.testing.assert_close(merged[k], W[k][0])
    plain = {k: W[k].mean(0) for k in W}
    f = lambda w: (torch.nn.functional.silu(X @ w["gate"].T) * (X @ w["up"].T)) @ w["down"].T  # noqa: E731
    assert (f(plain) - f({k: W[k][0] for k in W})).norm() > 0.1 * f({k: W[k][0] for k in W}).norm()


def test_hcsmoe_merges_a_cluster_whose_dominant_got_no_calibration_tokens():
    """A dominant expert with coefficient 0 (no routed calibration rows) merges into finite weights: the
    neurons nothing aligns to keep the dominant's, as the rule does when that coefficient tends to zero."""
    from molae.methods.hcsmoe import merge_fix_dom_same

    torch.manual_seed(12)
    m, n = 12, 20
    W = {"gate": torch.randn(2, m, n, dtype=f64), "up": torch.randn(2, m, n, dtype=f64),
         "down": torch.randn(2, n, m, dtype=f64)}
    X = torch.randn(100, n, dtype=f64)
    merged, near = merge_fix_dom_same(W, [0, 1], X, [0.0, 1.0]), merge_fix_dom_same(W, [0, 1], X, [1e-12, 1.0])
    for k in ("gate", "up", "down"):
        assert torch.isfinite(merged[k]).all(), k
        torch.testing.assert_close(merged[k], near[k])
    for coefs in ([0.0, 0.0], [0.0, 1.0]):  # a cluster no token reached at all, too
        assert all(torch.isfinite(v).all() for v in merge_fix_dom_same(W, [0, 1], X, coefs).values())


def test_reap_and_hcsmoe_use_the_routers_softmax_probabilities():
    """With the router's logits captured, REAP weighs each expert's output norm by softmax(logits)[e],
    not by the top-k weight a renormalizing router (Mixtral's) hands the experts."""
    torch.manual_seed(11)
    T, E, K, n, m = 50, 4, 2, 6, 5
    logits = torch.randn(T, E, dtype=f64)
    idx = logits.topk(K, dim=1).indices
    w = torch.softmax(logits.gather(1, idx), dim=1)  # renormalized over the top-k, as Mixtral
    x = torch.randn(T, n, dtype=f64)
    W = {"gate": torch.randn(E, m, n, dtype=f64), "up": torch.randn(E, m, n, dtype=f64),
         "down": torch.randn(E, n, m, dtype=f64)}
    inputs = LayerInputs(x, idx, w, E, logits_TE=logits)
    p = torch.softmax(logits, dim=1)
    for e in range(E):
        rows = (idx == e).any(1)
        out = (torch.nn.functional.silu(x[rows] @ W["gate"][e].T) * (x[rows] @ W["up"][e].T)) @ W["down"][e].T
        assert inputs.reap(W)[e].item() == pytest.approx((p[rows, e] * out.norm(dim=1)).sum().item(), rel=1e-9)
        torch.testing.assert_close(inputs.router_probs(e), p[rows, e])


def test_average_linkage_finds_planted_clusters():
    X = torch.tensor([[0.0, 0], [0.1, 0], [5, 5], [5.1, 5], [10, 0], [0, 0.1]])
    labels = average_linkage(X, 3)
    assert labels[0] == labels[1] == labels[5] and labels[2] == labels[3] and len(set(labels)) == 3


def test_pruning_keeps_the_top_scorers():
    count, reap = torch.tensor([10.0, 0, 5, 30]), torch.tensor([10.0, 0, 50, 3])
    assert keep_experts(count, 0.5, 1, "prune-frequency") == [0, 3]
    assert keep_experts(count, 0.5, 1, "prune-reap", reap) == [0, 2]
    assert keep_experts(count, 0.25, 2, "prune-reap", reap) == [0, 2]  # never fewer than top-k


# ----------------------------------------------------------------------------- real tiny models


def saved(family, path, **kw):
    model = tiny_model(family, vocab_size=512, dtype=torch.float32, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(path)
    return path


def test_error_power_moves_the_budget_towards_the_kinds_with_more_energy(data_dir, tmp_path):
    """--error-power P weighs each (layer, kind)'s error by its energy^-P: with down's weights planted small (a
    fifth of the others': 1/25 of their scale's energy), the absolute error (P = 0) gives down less of the budget
    than the relative one (P = 1), which counts every kind's error alike whatever its size."""
    model = tiny_model("qwen3_moe", vocab_size=512, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(0.1 if "experts.down_proj" in name else 0.5)
    model.save_pretrained(tmp_path / "src")
    down = {}
    for power in (0.0, 1.0):
        opts = ConvertOptions(budget=0.5, projections=("gate", "up", "down"), calibration=str(data_dir),
                              calib_tokens=512, calib_seq_len=64, error_power=power)
        s = convert_checkpoint(tmp_path / "src", tmp_path / f"p{power:g}", opts)
        down[power] = sum(r["latent_dim"] for r in s["layers"] if r.get("kind") == "down")
    assert down[0.0] < down[1.0]
    with pytest.raises(ValueError, match="--error-power 0.5: give a power from 0 to 1, with --budget"):
        convert_checkpoint(tmp_path / "src", tmp_path / "x", ConvertOptions(latent_dim=8, error_power=0.5))


def test_error_power_chooses_g_from_relative_errors_whatever_each_gs_energy():
    """With G choices, each G's whitened energy differs (G = E whitens each expert by its own inputs: about
    top-k / E of G = 1's energy); under --error-power 0.5 the G chosen must not depend on that: scaling one G's
    spectrum (its errors and energy alike) by any factor leaves every choice as it was. Weighing each G by its
    own energy^0.5 chose G = E everywhere on the DeepSeek-style reference (results/scratch/deepseek/)."""
    from types import SimpleNamespace

    from molae.convert import _allocate

    E, m, n = 8, 64, 128
    # G = 1's stack [E m, n] and G = E's per-expert [m, n] spectra: layer 1's shared latent decays fast (G = 1
    # pays), layer 3's hardly (one latent per expert pays)
    decay = {"1": 1.0, "2": 0.1, "3": 0.01}
    spectra = {((key, kind), G): torch.exp(-(decay[key] if G == 1 else 0.3) * torch.arange(n if G == 1 else m,
                                                                                          dtype=torch.float64))
               for key in decay for kind in ("gate", "up", "down") for G in (1, E)}
    by_layer = {int(k): SimpleNamespace(n_experts=E, inter=m, dim=n) for k in ("1", "2", "3")}

    def choices(power, scale_e):
        plan = {k: dict(latent={kind: None for kind in ("gate", "up", "down")}, groups=1, group_choices=(1, E))
                for k in ("1", "2", "3")}
        sp = {kk: {G: s2 * (scale_e if G == E else 1.0) for (k2, G), s2 in spectra.items() if k2 == kk}
              for kk in {k for k, _ in spectra}}
        _allocate(plan, sp, by_layer, ConvertOptions(budget=0.4, error_power=power))
        return {k: (p["groups"], tuple(p["latent"].values())) for k, p in plan.items()}

    for power in (1.0, 0.5):
        base = choices(power, 1.0)
        assert {G for G, _ in base.values()} == {1, E}, base  # a mix of choices, so that a bias would show
        for factor in (1 / 64, 64.0):
            assert choices(power, factor) == base, (power, factor)


def test_calibration_statistics_match_a_direct_count(data_dir, tmp_path):
    """The layer-by-layer capture sees exactly what the experts of the whole model see, and every
    statistic LayerInputs derives equals a direct count over those inputs."""
    src = saved("qwen2_moe", tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float64)
    use_standard_experts(model)  # the same experts module the runner installs
    ids = calibration_ids(data_dir, None, 256, 32)
    assert ids.shape == (8, 32)
    seen = {}
    for name, module in find_experts(model):
        module.register_forward_hook(lambda m, a, k, o, n=name: seen.setdefault(n, []).append(
            (a + tuple(k.values()))), with_kwargs=True)
    for b in range(0, 8, 4):
        model(input_ids=ids[b:b + 4])
    ckpt = SourceCheckpoint(src)
    groups = {g.layer: g for g in find_expert_groups(ckpt).values()}
    runner = LayerRunner(ckpt, groups, "cpu", torch.float64)
    hidden = runner.start(ids, 4)
    for i, (name, experts) in enumerate(find_experts(model)):
        hidden, (x, idx, w, logits) = runner.run(runner.load(i), i, hidden, capture=True)
        assert logits.shape == (x.shape[0], 8)  # the router's logits, every expert
        torch.testing.assert_close(torch.softmax(logits, 1).gather(1, idx), w)  # qwen2_moe: not renormalized
        assert len(seen[name]) == 2  # two batches of four windows
        for got, want in zip((x, idx, w), (torch.cat([t[j] for t in seen[name]]) for j in range(3))):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        inputs = LayerInputs(x, idx, w, 8)
        assert inputs.count.sum().item() == ids.numel() * 2  # every token, top-2
        W = experts.dense_weights()
        for e in (0, 5):
            xe = x[(idx == e).any(-1)]
            torch.testing.assert_close(inputs.gram(e), xe.T @ xe)
            he = torch.nn.functional.silu(xe @ W["gate"][e].T) * (xe @ W["up"][e].T)
            torch.testing.assert_close(inputs.hidden_gram(e, W), he.T @ he)
            out = he @ W["down"][e].T
            g = w[idx == e]
            assert inputs.reap(W)[e].item() == pytest.approx((g * out.norm(dim=1)).sum().item(), rel=1e-9)
            assert inputs.fisher(W)[e].item() == pytest.approx(((g * out.norm(dim=1)) ** 2).sum().item(), rel=1e-9)
            all_out = (torch.nn.functional.silu(x @ W["gate"][e].T) * (x @ W["up"][e].T)) @ W["down"][e].T
            torch.testing.assert_close(inputs.mean_outputs(W)[e], all_out.mean(0))
        torch.testing.assert_close(inputs.total_gram(), sum(inputs.gram(e) for e in range(8)))
        torch.testing.assert_close(inputs.group_gram([1, 2, 6]), sum(inputs.gram(e) for e in (1, 2, 6)))


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_every_method_converts_loads_and_keeps_its_budget(family, data_dir, tmp_path):
    src = saved(family, tmp_path / "src")
    ids = torch.from_numpy(D.TokenData(data_dir).val[:256].astype("int64"))[None]
    before = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    ref = before(input_ids=ids).logits
    calib = dict(calibration=str(data_dir), calib_tokens=512, calib_seq_len=64)
    for method in methods.METHODS:
        opts = ConvertOptions(method=method, budget=0.5, projections=("gate", "up", "down"), mobe_steps=20,
                              **(calib if methods.METHODS[method].calibration != "none" else {}))
        if method == "mobe":  # the published form (A_i m x m, down whole) cannot reach 50% at these shapes
            with pytest.raises(ValueError, match="published MoBE .* stores at least .* use --method mobe-lowrank"):
                convert_checkpoint(src, tmp_path / method, opts)
            continue
        s = convert_checkpoint(src, tmp_path / method, opts)
        assert s["after"]["expert_stored"] <= 0.5 * s["before"]["expert"] + 64, method  # + expert_slot maps
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / method), dtype=torch.float32)
        out = model(input_ids=ids).logits
        assert out.shape == ref.shape and torch.isfinite(out).all(), method
        if method.startswith("prune"):
            keys = ("num_experts", "num_local_experts", "n_routed_experts")
            E = sum(json.loads((tmp_path / method / "config.json").read_text()).get(k, 0) for k in keys)
            E0 = sum(json.loads((src / "config.json").read_text()).get(k, 0) for k in keys)
            assert E == E0 // 2 and 2 * s["after"]["expert"] == s["before"]["expert"]


def test_similarity_grouping_round_trips_through_load_and_decompress(data_dir, tmp_path):
    src = saved("qwen3_moe", tmp_path / "src")
    ids = torch.from_numpy(D.TokenData(data_dir).val[:128].astype("int64"))[None]
    opts = ConvertOptions(latent_dim=12, groups=2, group_by="similarity", projections=("gate", "up", "down"),
                          calibration=str(data_dir), calib_tokens=512, calib_seq_len=64)
    convert_checkpoint(src, tmp_path / "sim", opts)
    cfg = json.loads((tmp_path / "sim" / "config.json").read_text())
    assert all(v.get("permuted") for v in cfg["molae"]["layers"].values())
    molae_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sim"), dtype=torch.float64)
    slots = [m.expert_slot for _, m in find_experts(molae_model)]
    assert any((s != torch.arange(len(s))).any() for s in slots)  # some layer really was reordered
    decompress_checkpoint(tmp_path / "sim", tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), dtype=torch.float64,
                                                 experts_implementation="eager")
    torch.testing.assert_close(dense(input_ids=ids).logits, molae_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_budget_allocation_through_convert_keeps_the_budget(data_dir, tmp_path):
    src = saved("qwen2_moe", tmp_path / "src")
    opts = ConvertOptions(budget=0.4, projections=("gate", "up", "down"), calibration=str(data_dir),
                          calib_tokens=512, calib_seq_len=64)
    s = convert_checkpoint(src, tmp_path / "b", opts)
    assert 0.3 * s["before"]["expert"] < s["after"]["expert"] <= 0.4 * s["before"]["expert"]
    assert all("rel_output_error" in r for r in s["layers"])
    assert uniform_latent(0.5, 8, 16, 32) == int(0.5 * 8 * 16 * 32 // (32 + 8 * 16))


def test_balancing_keeps_the_function_and_healing_lowers_the_kl(data_dir, tmp_path):
    src = saved("qwen2_moe", tmp_path / "src")
    convert_checkpoint(src, tmp_path / "m", ConvertOptions(latent_dim=4, projections=("gate", "up", "down")))
    ids = torch.from_numpy(D.TokenData(data_dir).val[:128].astype("int64"))[None]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float64)
    before = model(input_ids=ids).logits
    assert balance_factors(model) == 2 * 3
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    untouched = {k: v for k, v in model.state_dict().items() if "experts" not in k}
    info = heal(tmp_path / "m", src, data_dir, tokens=64 * 8 * 30, seq_len=64, batch_size=8, lr=3e-3,
                progress=False)
    assert info["applied"] and info["held_out_kl_after"] < info["held_out_kl_before"]
    healed = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float64)
    for k, v in healed.state_dict().items():
        if k in untouched:  # only latent factors trained
            torch.testing.assert_close(v, untouched[k].to(v.dtype))
    assert (tmp_path / "m" / "heal.json").exists()


@pytest.mark.parametrize("method,family", [("prune-reap", "qwen2_moe"), ("hcsmoe", "mixtral")])
def test_heal_trains_a_dense_methods_experts_and_keeps_merged_ones_tied(method, family, data_dir, tmp_path):
    """[10] part 5: a method that writes whole experts is healed in them, with MoLAE's budget: the held-out KL
    falls, only the routed experts' tensors change, and experts HC-SMoE merged (bit-identical copies of one
    cluster's expert) are still identical afterwards, so the healed model stores what the method stored."""
    from molae.heal import identical_experts, whole_experts

    src = saved(family, tmp_path / "src")
    convert_checkpoint(src, tmp_path / "m", ConvertOptions(method=method, budget=0.5, calibration=str(data_dir),
                                                           calib_tokens=512, calib_seq_len=64))
    before = SourceCheckpoint(tmp_path / "m")
    old = {k: before.read([k])[k] for k in before.keys()}
    dense = whole_experts(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")))
    merged = {layer: identical_experts(dense[(layer, "gate_up_proj")], dense[(layer, "down_proj")])
              for layer, k in dense if k == "down_proj"}
    assert (method == "hcsmoe") == any(merged.values())  # HC-SMoE at 50% merges; pruning leaves distinct experts
    info = heal(tmp_path / "m", src, data_dir, tokens=64 * 8 * 30, seq_len=64, batch_size=8, lr=3e-3,
                progress=False)
    assert info["trained"] == "whole experts" and info["applied"]
    assert info["held_out_kl_after"] < info["held_out_kl_before"]
    assert info["trained_params"] == info["stored_params"]  # pruned and merged experts: what the method stores
    after = SourceCheckpoint(tmp_path / "m")
    experts = {k for g in find_expert_groups(after).values() for k in g.keys}
    changed = {k for k in after.keys() if not torch.equal(after.read([k])[k], old[k])}
    assert changed and changed <= experts  # routers, attention, shared experts untouched
    healed = whole_experts(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")))
    for layer, groups in merged.items():
        assert identical_experts(healed[(layer, "gate_up_proj")], healed[(layer, "down_proj")]) == groups


def test_quality_bench_runs_and_reports(data_dir, tmp_path, capsys):
    src = saved("mixtral", tmp_path / "src")
    code = main(["bench", "quality", "--model", str(src), "--name", "tiny", "--data", str(data_dir), "--device", "cpu",
                 "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "q.json"), "--calib-tokens", "512",
                 "--heal-tokens", "4096", "--heal-batch-size", "8", "--eval-tokens", "1024", "--seq-len", "64",
                 "--mobe-steps", "10", "--budgets", "0.5", "--rank-ratios", "1"])
    assert code == 0
    q = json.loads((tmp_path / "q.json").read_text())
    from molae.bench.quality import BASELINES

    assert len(q["runs"]) == 11 + 2 * len(BASELINES)  # every MoLAE variant, every other method, each healed
    healed = {r["variant"]: r for r in q["runs"] if "heal" in r}
    assert set(healed) == {"molae-alloc+heal", "molae-alloc-g+heal", "molae-alloc-sqrt+heal",
                           *(f"{b}+heal" for b in BASELINES if b != "mobe")}
    assert healed["svd+heal"]["method"] == "svd"
    assert len({h["heal"]["tokens"] for h in healed.values()}) == 1  # the same budget for every method
    trained = {v: h["heal"]["trained_params"] / h["heal"]["stored_params"] for v, h in healed.items()}
    assert trained["prune-reap+heal"] == trained["hcsmoe+heal"] == 1  # the experts they keep
    assert trained["d2moe+heal"] > 1 and trained["mobe-lowrank+heal"] > 1  # their weights, written multiplied out
    reached = [r for r in q["runs"] if "unreachable" not in r]
    assert all(math.isfinite(r["perplexity"]) for r in reached)
    assert [r["variant"] for r in q["runs"] if "unreachable" in r] == ["mobe", "mobe+heal"]  # m > n: MoBE cannot
    by_variant = {r["variant"]: r for r in reached}  # each run records G, d and the error per layer and kind
    for layer, kind, groups, d, _ in by_variant["molae-alloc-g"]["layers"]:
        assert kind in ("gate", "up", "down") and groups in (1, 2, 4) and (kind, d) in map(
            tuple, by_variant["molae-alloc-g"]["latent"])
    assert {row[2] for row in by_variant["molae-alloc"]["layers"]} == {1}
    assert main(["bench", "quality", "--model", str(src), "--name", "tiny", "--data", str(data_dir), "--device", "cpu",
                 "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "q.json"), "--resume", "--budgets", "0.5",
                 "--rank-ratios", "1", "--seq-len", "64", "--eval-tokens", "1024", "--calib-tokens", "512"]) == 0
    assert len(json.loads((tmp_path / "q.json").read_text())["runs"]) == 11 + 2 * len(BASELINES)  # none run twice
    assert main(["analyze", str(src), "--out", str(tmp_path / "an")]) == 0  # the model's redundancy beside it
    capsys.readouterr()
    assert main(["bench", "quality-report", str(tmp_path / "q.json"), "--out", str(tmp_path / "r"),
                 "--analysis", f"tiny={tmp_path / 'an' / 'analysis.json'}"]) == 0
    md = (tmp_path / "r" / "quality.md").read_text()
    assert "| molae-alloc+heal |" in md and (tmp_path / "r" / "quality.png").stat().st_size > 0
    assert "## Expert redundancy of the models" in md and "| tiny | gate | " in md
    with pytest.raises(SystemExit) as bad:  # argparse's exit 2, one line naming the fix, nothing written
        main(["bench", "quality-report", str(tmp_path / "q.json"), "--out", str(tmp_path / "r2"),
              "--analysis", "tiny=/no/such.json"])
    assert bad.value.code == 2 and not (tmp_path / "r2").exists()
    assert "give NAME=FILE with FILE an existing analysis.json" in capsys.readouterr().err
    for r in [q["original"], *reached]:  # intervals per cell, and the windows they resample
        lo, hi = r["perplexity_95"]
        assert lo <= r["perplexity"] <= hi and len(r["window_nll"]) == 1024 // 64
        assert math.exp(sum(r["window_nll"]) / len(r["window_nll"])) == pytest.approx(r["perplexity"], rel=1e-5)
    assert "paired 95%" in md and any(f"| {v} |" in md for v in ("better", "tied", "worse"))
    for r in [q["original"], *reached]:
        assert 0 <= r["next_line"] <= 1 and r["lines"] == sum(r["window_lines"]) > 0
    assert "exact-match next-line completion" in md
    assert "window_nll" not in (tmp_path / "r" / "quality.json").read_text()  # the run files keep them


def test_paired_intervals_say_better_only_where_they_exclude_zero():
    from molae.evaluate import paired_change, perplexity_interval, verdict

    g = torch.Generator().manual_seed(0)
    ref = 2 + torch.rand(400, generator=g, dtype=torch.float64)
    change, lo, hi = paired_change(ref - 0.01, ref)  # lower on every window: better, however noisy the windows
    assert change == pytest.approx(math.exp(-0.01) - 1) and lo <= change <= hi < 0 and verdict((lo, hi)) == "better"
    noise = 0.05 * torch.randn(400, generator=g, dtype=torch.float64)
    assert verdict(paired_change(ref + noise, ref)[1:]) == "tied"
    assert verdict(paired_change(ref + 0.02 + noise, ref)[1:]) == "worse"
    lo, hi = perplexity_interval(ref)
    assert lo < math.exp(ref.mean()) < hi


def _run_file(name, seed, offsets, original=2.0, windows=300):
    """A bench quality run file as `molae bench quality` writes it, with planted window NLLs: each variant's
    windows are the original's plus its offset (nats), with window noise shared by all of them."""
    g = torch.Generator().manual_seed(1)
    base = original + 0.3 * torch.randn(windows, generator=g, dtype=torch.float64)
    params = {"routed": 100, "routed_before": 200, "total": 300}

    def scored(nll, **extra):
        return dict(extra, perplexity=math.exp(float(nll.mean())), bits_per_byte=1.0, params=params,
                    window_nll=nll.tolist())

    runs = [scored(base + off, variant=v, budget=b, method=v.split("+")[0] if v.startswith("svd") else
                   ("molae" if v.startswith("molae") else v)) for (v, b), off in offsets.items()]
    return {"name": name, "model": "/m", "shapes": {"experts": 4, "inter": 8, "dim": 16, "top_k": 2},
            "device": "cpu", "date": "today", "commit": "c", "command": "cmd",
            "settings": {"calib_tokens": 1, "heal_tokens": 1, "eval_tokens": 1, "eval_bytes": 1, "calib_seed": seed},
            "original": scored(base), "runs": runs}


def test_report_tables_the_calibration_samples_and_the_margin_along_training(tmp_path):
    from molae.bench.quality import report

    files = []
    for name, seed, off in [("early", 0, {("molae-alloc", 0.5): 0.01, ("svd", 0.5): 0.01}),
                            ("late", 0, {("molae-alloc", 0.5): 0.01, ("svd", 0.5): 0.03}),
                            ("late-seed1", 1, {("molae-alloc", 0.5): 0.02, ("svd", 0.5): 0.03})]:
        r = _run_file(name, seed, off)
        if name == "early":
            r["model"] = "/m-early"  # another model: not a calibration sample of /m
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(r))
    report(files[:2], tmp_path / "trend", trend=True)
    md = (tmp_path / "trend" / "quality.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| early |") or line.startswith("| late |")]
    assert len(rows) == 2 and "Calibration samples" not in md
    assert "molae-alloc vs svd: +0.00% [+0.00, +0.00] tied" in rows[0]  # equal offsets: equal on every window
    assert f"molae-alloc vs svd: {100 * (math.exp(-0.02) - 1):+.2f}%" in rows[1] and rows[1].endswith("better |")
    late = json.loads(files[1].read_text())  # a healed variant beside its unhealed conversion
    late["runs"].append(dict(late["runs"][0], variant="molae-alloc+heal",
                             window_nll=[v - 0.005 for v in late["runs"][0]["window_nll"]]))
    files[1].write_text(json.dumps(late))
    report(files[1:], tmp_path / "seeds")
    md = (tmp_path / "seeds" / "quality.md").read_text()
    assert "## Calibration samples: late-seed1 (seed 1) against late (seed 0)" in md and "Along training" not in md
    seeds = [line for line in md.split("## Calibration samples")[1].splitlines() if line.startswith("| molae")
             or line.startswith("| svd")]
    assert len(seeds) == 2
    assert f"| {100 * (math.exp(0.01) - 1):+.3f}%" in seeds[0] and seeds[0].endswith("worse |")
    assert seeds[1].endswith("tied |")
    assert f"| molae-alloc+heal | 50% | {100 * (math.exp(-0.005) - 1):+.2f}%" in md


def test_report_names_a_failed_run_and_never_ranks_it(tmp_path):
    """A run with a non-finite held-out loss (HC-SMoE's NaN weights at 02e0904) is listed as failed and is
    not the best baseline, wherever it comes in the file."""
    from molae.bench.quality import report

    r = _run_file("m", 0, {("hcsmoe", 0.5): 0.0, ("molae-alloc", 0.5): 0.01, ("svd", 0.5): 0.03})
    r["runs"][0].update(perplexity=float("nan"), window_nll=[float("nan")] * 300)
    (tmp_path / "m.json").write_text(json.dumps(r))
    report([tmp_path / "m.json"], tmp_path / "out")
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "- failed: hcsmoe at 50%: non-finite held-out loss" in md
    verdict = next(line for line in md.splitlines() if line.startswith("| 50% | molae-alloc"))
    assert "| svd " in verdict and verdict.endswith("better |")


def test_report_merges_one_samples_files_and_keeps_other_samples_apart(tmp_path):
    """A later job's other budgets on the same model and calibration sample join its section (a cell already
    there is not taken twice); another calibration sample keeps its own section and no column of its own
    across models."""
    from molae.bench.quality import report

    first = _run_file("m", 0, {("molae-alloc", 0.5): 0.01, ("svd", 0.5): 0.03})
    more = _run_file("m-75", 0, {("molae-alloc", 0.75): 0.005, ("svd", 0.75): 0.01, ("svd", 0.5): 0.5})
    other = _run_file("m-seed1", 1, {("molae-alloc", 0.5): 0.02})
    for name, r in [("a", first), ("b", more), ("c", other)]:
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    report([tmp_path / f"{n}.json" for n in "abc"], tmp_path / "out")
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "## m\n" in md and "## m-75" not in md and "## m-seed1" in md
    section = md.split("## m\n")[1].split("## m-seed1")[0]
    assert "| method | 75% | 50% |" in section
    svd = next(line for line in section.splitlines() if line.startswith("| svd |"))
    kept, dropped = (f"{r['runs'][-1]['perplexity']:.3f}" for r in (first, more))  # svd at 50% in each file
    assert kept in svd and dropped not in svd
    assert "| budget | m data-free / best MoLAE |" in md  # one column: one model


def test_another_calibration_seed_is_another_sample(data_dir, tmp_path):
    from molae.convert import ConvertOptions, _calibration_windows as calibration_windows

    src = saved("qwen2_moe", tmp_path / "src")
    from molae.checkpoint import SourceCheckpoint

    ck = SourceCheckpoint(src)
    a, b, c = (calibration_windows(ck, ConvertOptions(calibration=str(data_dir), calib_tokens=256, calib_seq_len=32,
                                                      calib_seed=s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == c.shape


@pytest.mark.parametrize("args, message", [
    (["--budget", "1.5"], "--budget 1.5 is out of range"),
    (["--method", "svd"], "needs --budget"),
    (["--method", "hcsmoe", "--budget", "0.5"], "needs --calibration"),
    (["--budget", "0.5", "--latent-dim", "4"], "give one of them"),
    (["--rank-ratio", "0.5", "--calibration", "x"], "leave it out with --calibration"),
    (["--method", "d2moe", "--budget", "0.5", "--groups", "2"], "MoLAE options"),
])
def test_bad_convert_options_are_one_line_and_write_nothing(args, message, tmp_path, capsys):
    src = saved("qwen2_moe", tmp_path / "src")
    capsys.readouterr()  # the save's progress bar
    code = main(["convert", str(src), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_heal_refuses_a_model_that_is_not_molae(data_dir, tmp_path, capsys):
    src = saved("qwen2_moe", tmp_path / "src")
    capsys.readouterr()
    code = main(["heal", str(src), "--teacher", str(src), "--data", str(data_dir), "--tokens", "4096"])
    err = capsys.readouterr().err
    assert code != 0 and "not a MoLAE checkpoint nor a compressed one" in err and len(err.strip().splitlines()) == 1


def test_next_line_exact_match_counts_the_lines_every_argmax_got_right():
    from molae.evaluate import line_exact_match

    nl = torch.zeros(10, dtype=torch.bool)
    nl[9] = True  # token 9 ends a line
    #             targets: 9 | 1 2 3 9 | 4 5 9 | 1 2 3 4 9 | 7   (the lines between the first and last newline)
    w = torch.tensor([[0, 9, 1, 2, 3, 9, 4, 5, 9, 1, 2, 3, 4, 9, 7]])
    hit = torch.ones(1, 14, dtype=torch.bool)
    hit[0, 10] = False  # a miss inside the 5-token line
    matched, lines = line_exact_match(w, hit, nl, min_tokens=4)
    assert lines.tolist() == [2] and matched.tolist() == [1]  # "1 2 3 9" exact; "4 5 9" too short; the last missed
    hit[0, 0] = hit[0, 13] = False  # misses outside whole lines change nothing
    assert line_exact_match(w, hit, nl, min_tokens=4)[1].tolist() == [2]
    assert line_exact_match(w, hit, nl, min_tokens=3)[0].tolist() == [2]  # "4 5 9" counts now


def test_group_choices_let_the_budget_choose_g_per_layer(data_dir, tmp_path, capsys):
    src = saved("mixtral", tmp_path / "src")  # 4 experts per layer
    base = dict(budget=0.5, projections=("gate", "up", "down"), calibration=str(data_dir), calib_tokens=512,
                calib_seq_len=64)
    convert_checkpoint(src, tmp_path / "plain", ConvertOptions(**base))
    convert_checkpoint(src, tmp_path / "one", ConvertOptions(**base, group_choices=(1,)))
    cfg = lambda d: json.loads((tmp_path / d / "config.json").read_text())["molae"]["layers"]  # noqa: E731
    assert cfg("one") == cfg("plain")  # a single choice is the plain conversion
    s = convert_checkpoint(src, tmp_path / "auto", ConvertOptions(**base, group_choices=(1, "E")))
    assert {v["groups"] for v in cfg("auto").values()} <= {1, 4}
    assert s["after"]["expert_stored"] <= 0.5 * s["before"]["expert"]
    ids = torch.randint(0, 512, (2, 16))
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "auto")
    assert torch.isfinite(m(ids).logits).all()
    with pytest.raises(ValueError, match="does not divide"):
        convert_checkpoint(src, tmp_path / "bad", ConvertOptions(**base, group_choices=(3,)))
    with pytest.raises(ValueError, match="needs --budget"):
        convert_checkpoint(src, tmp_path / "bad", ConvertOptions(latent_dim=8, group_choices=(1, 2)))
    with pytest.raises(SystemExit):
        main(["convert", str(src), "--out", str(tmp_path / "x"), "--budget", "0.5", "--group-choices", "1,x"])
    assert "each choice is a whole number >= 1 or E" in capsys.readouterr().err


def test_g_per_layer_with_groups_by_similarity_is_the_fixed_g_conversion_where_one_g_is_offered(data_dir, tmp_path):
    """--group-choices with --group-by similarity (bench's molae-alloc-g-sim): offered one G, it writes what
    --groups G --group-by similarity writes (same plan, same permuted factors)."""
    from safetensors.torch import load_file

    src = saved("mixtral", tmp_path / "src")  # 4 experts per layer
    base = dict(budget=0.5, projections=("gate", "up", "down"), calibration=str(data_dir), calib_tokens=512,
                calib_seq_len=64, group_by="similarity")
    convert_checkpoint(src, tmp_path / "fixed", ConvertOptions(**base, groups=2))
    convert_checkpoint(src, tmp_path / "chosen", ConvertOptions(**base, group_choices=(2,)))
    cfg = lambda d: json.loads((tmp_path / d / "config.json").read_text())["molae"]["layers"]  # noqa: E731
    assert cfg("chosen") == cfg("fixed") and all(v.get("permuted") for v in cfg("fixed").values())
    a, b = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("fixed", "chosen"))
    assert a.keys() == b.keys() and any("expert_slot" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ValueError, match="without --groups or --group-by routing"):
        convert_checkpoint(src, tmp_path / "bad", ConvertOptions(**dict(base, group_by="routing"), group_choices=(1,)))


def test_report_also_sets_unhealed_against_unhealed(tmp_path):
    """Healed MoLAE ahead of a peer that was not healed (mobe-lowrank on the Qwen-style reference at 25%,
    64fc599), unhealed MoLAE behind it: the first verdict table says better, the unhealed one worse."""
    from molae.bench.quality import report

    r = _run_file("m", 0, {("molae-alloc", 0.25): 0.05, ("molae-alloc+heal", 0.25): 0.01,
                           ("mobe-lowrank", 0.25): 0.03, ("svd", 0.25): 0.06, ("svd+heal", 0.25): 0.04})
    (tmp_path / "m.json").write_text(json.dumps(r))
    report([tmp_path / "m.json"], tmp_path / "out")
    md = (tmp_path / "out" / "quality.md").read_text()
    first, second = md.split("Unhealed against unhealed")
    best = next(line for line in first.splitlines() if line.startswith("| 25% | molae-alloc+heal"))
    assert "| mobe-lowrank " in best and best.endswith("better |")
    plain = next(line for line in second.splitlines() if line.startswith("| 25% |"))
    assert plain.startswith("| 25% | molae-alloc ") and "| mobe-lowrank " in plain and plain.endswith("worse |")
    assert "+heal" not in plain

    r["runs"] = [x for x in r["runs"] if x["variant"] != "molae-alloc+heal"]  # healed runs, none best: one table
    (tmp_path / "m.json").write_text(json.dumps(r))
    report([tmp_path / "m.json"], tmp_path / "out")
    assert "Unhealed against unhealed" not in (tmp_path / "out" / "quality.md").read_text()


def test_the_margin_along_training_sets_unhealed_against_unhealed(tmp_path):
    """An end point with healed runs (scratch_reference.sh's main file) beside exports converted unhealed: the
    margin compares the unhealed runs at every point."""
    from molae.bench.quality import report

    early = _run_file("early", 0, {("molae-alloc", 0.5): 0.02, ("svd", 0.5): 0.03})
    end = _run_file("end", 0, {("molae-alloc", 0.5): 0.02, ("molae-alloc+heal", 0.5): 0.001, ("svd", 0.5): 0.03,
                               ("svd+heal", 0.5): 0.01})
    for name, r in [("early", early), ("end", end)]:
        r["model"] = f"/{name}"
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    report([tmp_path / "early.json", tmp_path / "end.json"], tmp_path / "out", trend=True)
    trend = (tmp_path / "out" / "quality.md").read_text().split("## Along training")[1]
    row = next(line for line in trend.splitlines() if line.startswith("| end |"))
    assert "molae-alloc vs svd:" in row and "+heal vs" not in row and "vs svd+heal" not in row


def test_the_g_variants_choose_among_the_divisors_of_e():
    from molae.bench.quality import GROUP_CHOICES, g_choices, variants

    assert g_choices(GROUP_CHOICES, 24) == (1, 2, 4, 8, "E") and g_choices(None, 24) is None
    assert g_choices("divisors", 24) == (1, 2, 3, 4, 6, 8, 12, "E")
    assert g_choices("divisors", 8) == g_choices(GROUP_CHOICES, 8) == (1, 2, 4, "E")
    spec = {name: s for name, _, s in variants([0.5], [1.0], {"molae-alloc-g-sim", "molae-alloc-g-div"})}
    assert spec["molae-alloc-g-sim"]["group_by"] == "similarity"
    assert spec["molae-alloc-g-div"]["group_choices"] == "divisors"
