"""MoE and MoLAE layers: fast path against the reference loop (forward and backward),
grouped matmul against a plain loop, routers, exact parameter accounting."""

import copy

import pytest
import torch

from molae.layers import (
    PRESETS,
    Experts,
    MoE,
    MoEConfig,
    MoLAE,
    MoLAEConfig,
    _grouped_mm_supported,
    grouped_linear,
    load_balancing_loss,
    n_params,
    param_counts,
)


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


CASES = [  # (latent dims, groups)
    ({}, 1),
    ({"up": 16, "gate": 16}, 1),
    ({"up": 8, "gate": 24}, 2),
    ({"gate": 12, "up": 12, "down": 12}, 4),
    ({"down": 16}, 1),
    ({"up": 8, "down": 8}, 8),
]


def grads(module, x, y_grad, fn):
    module.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(y_grad)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def check_paths_agree(experts, x_TD, idx_TK, w_TK, rtol, atol, backend=None):
    y_grad = torch.randn_like(x_TD)
    ref = grads(experts, x_TD, y_grad, lambda x: experts.forward_reference(x, idx_TK, w_TK))
    fast = grads(experts, x_TD, y_grad, lambda x: experts.forward_fast(x, idx_TK, w_TK, backend))
    torch.testing.assert_close(fast[0], ref[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(fast[1], ref[1], rtol=rtol, atol=atol)
    for name in ref[2]:
        torch.testing.assert_close(fast[2][name], ref[2][name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def random_routing(T, E, K, gen, dtype):
    idx_TK = torch.rand(T, E, generator=gen).argsort(-1)[:, :K]  # K distinct experts per token
    w_TK = torch.rand(T, K, generator=gen, dtype=dtype)
    return idx_TK, w_TK


@pytest.mark.parametrize("latent,groups", CASES)
def test_fast_path_matches_reference_float64(latent, groups):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    experts = Experts(32, 24, 8, latent, groups).double()
    x = torch.randn(37, 32, generator=gen, dtype=torch.float64)
    idx, w = random_routing(37, 8, 3, gen, torch.float64)
    check_paths_agree(experts, x, idx, w, rtol=1e-10, atol=1e-10)  # float64: the padded-bmm fallback


@pytest.mark.parametrize("latent,groups", CASES)
@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
def test_fast_path_matches_reference_float32(latent, groups, backend):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    experts = Experts(32, 24, 8, latent, groups)
    x = torch.randn(50, 32, generator=gen)
    idx, w = random_routing(50, 7, 2, gen, torch.float32)
    idx[idx >= 5] += 1  # expert 5 receives no token
    check_paths_agree(experts, x, idx, w, rtol=1e-4, atol=1e-5, backend=backend)


def test_grouped_mm_is_taken_where_supported():
    x = torch.randn(10, 32)
    w = torch.randn(4, 24, 32)
    assert _grouped_mm_supported(x, w)
    assert not _grouped_mm_supported(x.double(), w.double())  # no float64 kernel
    assert not _grouped_mm_supported(torch.randn(10, 30), torch.randn(4, 24, 30))  # 120-byte rows


def test_grouped_linear_matches_a_loop_with_empty_experts_and_padding_rows():
    gen = torch.Generator().manual_seed(fresh_seed())
    E, S, pad = 6, 40, 7
    expert_S = torch.sort(torch.randint(0, E, (S,), generator=gen)).values
    expert_S[expert_S == 2] = 3  # expert 2 receives nothing
    expert_S = torch.sort(expert_S).values
    offs = torch.cumsum(torch.bincount(expert_S, minlength=E), 0).to(torch.int32)
    x = torch.randn(S + pad, 16, generator=gen)  # rows past offs[-1] are padding: outputs unspecified
    w = torch.randn(E, 8, 16, generator=gen)
    expected = torch.stack([w[e] @ x[s] for s, e in enumerate(expert_S.tolist())])
    for backend in ("grouped_mm", "bmm"):
        torch.testing.assert_close(grouped_linear(x, w, offs, backend)[:S], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_moe_and_molae_layers_reference_vs_fast(router):
    torch.manual_seed(fresh_seed())
    cfg = MoLAEConfig(32, 16, 8, 2, router=router, norm_topk_prob=router == "sigmoid", routed_scale=1.5,
                      shared_inter=24, shared_gate=True, groups=2, latent_dim=12, projections=("up", "gate", "down"))
    for layer in (MoE(MoEConfig(**{k: v for k, v in cfg.to_dict().items()
                                   if k not in ("groups", "latent_dim", "projections")})), MoLAE(cfg)):
        layer = layer.double()
        x = torch.randn(4, 9, 32, dtype=torch.float64)
        y_fast, aux_fast = layer(x)
        layer.impl = "reference"
        y_ref, aux_ref = layer(x)
        assert y_fast.shape == x.shape
        torch.testing.assert_close(y_fast, y_ref)
        torch.testing.assert_close(aux_fast, aux_ref)


def test_same_router_weights_route_moe_and_molae_identically():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(32, 16, 8, 2, shared_inter=16))
    molae = MoLAE(MoLAEConfig.from_moe(moe.cfg, latent_dim=8))
    molae.router.load_state_dict(moe.router.state_dict())
    x = torch.randn(64, 32)
    w1, i1, _ = moe.router(x)
    w2, i2, _ = molae.router(x)
    assert torch.equal(i1, i2) and torch.equal(w1, w2)


def test_routers():
    torch.manual_seed(0)
    x = torch.randn(100, 16)
    soft = MoE(MoEConfig(16, 8, 6, 2, norm_topk_prob=True)).router
    w, idx, _ = soft(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(100))
    probs = torch.softmax(x @ soft.weight.T, -1)
    assert torch.equal(idx, probs.topk(2, -1).indices)
    sig = MoE(MoEConfig(16, 8, 6, 2, router="sigmoid", routed_scale=2.5)).router
    sig.bias[3] = 100.0  # the bias chooses expert 3 for every token ...
    w, idx, _ = sig(x)
    assert (idx == 3).any(-1).all()
    scores = torch.sigmoid(x @ sig.weight.T)  # ... but the weights stay the unbiased scores, scaled
    torch.testing.assert_close(w, 2.5 * scores.gather(1, idx))


def test_group_limited_routing_matches_transformers_deepseek_v3_router():
    """n_group / topk_group as DeepSeek-V3 routes (transformers' DeepseekV3TopkRouter), on fresh random inputs
    and a random correction bias: the same experts and weights; each token's experts in <= topk_group groups."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(fresh_seed())
    E, K, G, Gk = 16, 4, 4, 2
    hf = DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=16, n_routed_experts=E, num_experts_per_tok=K, n_group=G,
                                               topk_group=Gk, norm_topk_prob=True, routed_scaling_factor=2.5))
    ours = MoE(MoEConfig(16, 8, E, K, router="sigmoid", norm_topk_prob=True, routed_scale=2.5, n_group=G,
                         topk_group=Gk)).router
    with torch.no_grad():
        hf.weight.normal_(0, 0.5)
        hf.e_score_correction_bias.normal_(0, 0.3)
        ours.weight.copy_(hf.weight)
        ours.bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(200, 16)
    w, idx, _ = ours(x)
    _, w_hf, idx_hf = hf(x)
    order, order_hf = idx.sort(-1), idx_hf.sort(-1)  # transformers returns them unsorted
    assert torch.equal(order.values, order_hf.values)
    torch.testing.assert_close(w.gather(1, order.indices), w_hf.gather(1, order_hf.indices), rtol=1e-5, atol=1e-6)
    groups_per_token = torch.tensor([len(set((r // (E // G)).tolist())) for r in idx])
    assert groups_per_token.max() <= Gk and (groups_per_token == Gk).any()
    free = MoE(MoEConfig(16, 8, E, K, router="sigmoid", norm_topk_prob=True, routed_scale=2.5)).router
    free.load_state_dict(ours.state_dict())
    assert not torch.equal(free(x)[1].sort(-1).values, order.values)  # the limit changed some tokens' experts


def test_group_limited_softmax_routing_keeps_each_token_in_its_best_groups():
    torch.manual_seed(fresh_seed())
    r = MoE(MoEConfig(16, 8, 12, 3, n_group=3, topk_group=1)).router
    x = torch.randn(100, 16)
    w, idx, _ = r(x)
    probs = torch.softmax(x @ r.weight.T, -1)
    best = probs.view(100, 3, 4).max(-1).values.argmax(-1)  # DeepSeek-V2's group score: its best expert
    assert torch.equal(idx // 4, best[:, None].expand(100, 3))
    torch.testing.assert_close(w, probs.gather(1, idx))
    with pytest.raises(ValueError, match="n_group must divide"):
        MoEConfig(16, 8, 12, 3, n_group=5)
    with pytest.raises(ValueError, match="raise topk_group"):
        MoEConfig(16, 8, 12, 5, n_group=3, topk_group=1)


def test_load_balancing_loss():
    T, E, K = 64, 8, 2
    probs = torch.full((T, E), 1 / E)
    balanced = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)
    assert load_balancing_loss(probs, balanced).item() == pytest.approx(1.0)
    peaked = torch.zeros(T, E)
    peaked[:, :K] = 1 / K
    collapsed = torch.tensor([[0, 1]]).expand(T, K)
    assert load_balancing_loss(peaked, collapsed).item() == pytest.approx(E / K)


CONFIGS = [
    MoEConfig(32, 16, 8, 2),
    MoEConfig(32, 16, 8, 2, shared_inter=24, shared_gate=True),
    MoLAEConfig(32, 16, 8, 2, shared_inter=24),
    MoLAEConfig(32, 16, 8, 2, groups=4, latent_dim=5, projections=("up", "gate", "down")),
    MoLAEConfig(32, 16, 8, 2, groups=2, latent_dim={"up": 3, "down": 9}, projections="up,down"),
]


@pytest.mark.parametrize("cfg", CONFIGS + list(PRESETS.values()), ids=lambda c: type(c).__name__)
def test_parameter_accounting_is_exact(cfg):
    with torch.device("meta"):  # real shapes (DeepSeek-V3 too) without allocating them
        layer = MoLAE(cfg) if isinstance(cfg, MoLAEConfig) else MoE(cfg)
        molae = MoLAE(MoLAEConfig.from_moe(cfg, groups=4, projections=("gate", "up", "down"))) \
            if not isinstance(cfg, MoLAEConfig) else layer
    for lay in (layer, molae):
        counts = param_counts(lay.cfg)
        assert counts["total"] == n_params(lay)
        assert counts["routed"] == n_params(lay.experts)
        assert counts["shared_proj"] == sum(p.numel() for n, p in lay.experts.named_parameters() if n.endswith("_B"))
        assert counts["router"] == n_params(lay.router)
        assert counts["shared_expert"] == (n_params(lay.shared) if lay.shared else 0) + (
            n_params(lay.shared_gate) if lay.shared_gate else 0)


def test_expert_parameter_savings_at_real_shapes():
    """MOLAE.md §2: about 70% of expert parameters saved at DeepSeek-V3 shapes (d = m, all three
    projections), about 30% for Qwen1.5-MoE-A2.7B."""
    def saving(name):
        cfg = PRESETS[name]
        latent = MoLAEConfig.from_moe(cfg, projections=("up", "gate", "down"))
        return 1 - param_counts(latent)["routed"] / param_counts(cfg)["routed"]
    assert 0.69 < saving("deepseek-v3") < 0.72
    assert 0.28 < saving("qwen1.5-moe-a2.7b") < 0.32


def test_invalid_configs():
    with pytest.raises(ValueError, match=r"groups=3 does not divide n_experts=8"):
        MoLAEConfig(32, 16, 8, 2, groups=3)
    with pytest.raises(ValueError, match=r"latent_dim\[gate\]=40 is out of range: .* = 32"):
        MoLAEConfig(32, 16, 8, 2, latent_dim=40)
    with pytest.raises(ValueError, match=r"latent_dim\[gate\]=0 is out of range"):
        MoLAEConfig(32, 16, 8, 2, latent_dim=0)
    with pytest.raises(ValueError, match=r"top_k=9 is out of range"):
        MoEConfig(32, 16, 8, 9)
    with pytest.raises(ValueError, match=r"router='relu' is not known"):
        MoEConfig(32, 16, 8, 2, router="relu")
    with pytest.raises(ValueError, match=r"impl='turbo' is not known"):
        MoE(MoEConfig(32, 16, 8, 2)).impl = "turbo"
    with pytest.raises(TypeError, match=r"MoLAE takes a MoLAEConfig"):
        MoLAE(MoEConfig(32, 16, 8, 2))


def test_dense_weights_multiply_the_factors_out():
    experts = Experts(16, 8, 4, {"gate": 5, "down": 6}, groups=2).double()
    dense = experts.dense_weights()
    for kind in ("gate", "up", "down"):
        for e in range(4):
            torch.testing.assert_close(dense[kind][e], experts.expert_weight(kind, e))
    torch.testing.assert_close(dense["gate"][3], experts.gate_A[3] @ experts.gate_B[1])
    torch.testing.assert_close(dense["down"][0], experts.down_B[0] @ experts.down_A[0])


def test_training_reduces_loss_on_both_paths():
    """Both paths are differentiable end to end: Adam steps fit a teacher layer's outputs."""
    torch.manual_seed(fresh_seed())
    cfg = MoLAEConfig(32, 16, 8, 2, groups=2, latent_dim=8, projections=("up", "gate", "down"))
    teacher, student = MoLAE(cfg), MoLAE(cfg)
    student.router.load_state_dict(teacher.router.state_dict())
    x = torch.randn(64, 32)
    with torch.no_grad():
        target = teacher(x)[0]
    for impl in ("fast", "reference"):
        model = copy.deepcopy(student)
        model.impl = impl
        opt = torch.optim.Adam(model.experts.parameters(), lr=1e-2)
        losses = []
        for _ in range(40):
            loss = (model(x)[0] - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], (impl, losses)


def test_grouped_linear_backward_matches_autograd_and_zeroes_idle_experts():
    """The written-out grouped GEMM backward agrees with autograd through the padded-bmm path, and an
    expert with no rows gets an exact zero weight gradient (never allocator garbage)."""
    from molae.layers import grouped_linear

    torch.manual_seed(3)
    expert_S = torch.tensor([0, 0, 0, 2, 2, 2, 2, 3, 3, 3])  # expert 1 idle
    offs_E = torch.cumsum(torch.bincount(expert_S, minlength=4), 0).to(torch.int32)
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(4, 8, 16, requires_grad=True)
    g = torch.randn(10, 8)
    grads = []
    for backend in ("grouped_mm", "bmm"):
        x.grad = w.grad = None
        (grouped_linear(x, w, offs_E, backend) * g).sum().backward()
        grads.append((x.grad.clone(), w.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert torch.equal(grads[0][1][1], torch.zeros(8, 16))


@pytest.mark.parametrize("T,E,K,G", [(37, 8, 3, 1), (37, 8, 3, 4), (50, 16, 4, 8), (9, 8, 2, 8)])
def test_routing_maps_are_exact_adjoint_pairs(T, E, K, G):
    """Each row map's backward is its reverse map, so <A x, y> = <x, A* y> must hold exactly (float64);
    pair rows past offs_G[-1] are padding and are left out of the comparison."""
    from molae.layers import Routing

    gen = torch.Generator().manual_seed(fresh_seed())
    idx, _ = random_routing(T, E, K, gen, torch.float64)
    r = Routing(idx, E, G)
    S = T * K
    assert torch.equal(r.expert_S, idx.reshape(-1)[r.order_S]) and bool((r.expert_S.diff() >= 0).all())
    assert r.offs_E[-1] == S and torch.equal(torch.diff(r.offs_E, prepend=r.offs_E.new_zeros(1)),
                                            torch.bincount(idx.reshape(-1), minlength=E).int())
    space = {"T": (T, T), "S": (S, S)}  # row space: (rows allocated, rows valid)
    maps = [(r.slots_from_tokens, r.tokens_from_slots, "T", "S")]
    if G > 1:
        n_pairs = int(r.offs_G[-1])
        assert n_pairs == sum(len(set((row // (E // G)).tolist())) for row in idx)  # distinct (token, group)s
        space["P"] = (len(r.tok_P), n_pairs)
        maps += [(r.slots_from_pairs, r.pairs_from_slots, "P", "S"), (r.pairs_from_tokens, r.tokens_from_pairs, "T", "P")]
    for fwd, rev, a, b in maps:
        (na, va), (nb, vb) = space[a], space[b]
        x = torch.randn(na, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(nb, 5, generator=gen, dtype=torch.float64)
        y[vb:] = 0  # padding rows carry nothing
        lhs = (fwd(x)[:vb] * y[:vb]).sum()
        rhs = (x[:va] * rev(y)[:va]).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
        xg = x.clone().requires_grad_()  # and the backward is that adjoint
        (fwd(xg)[:vb] * y[:vb]).sum().backward()
        torch.testing.assert_close(xg.grad[:va], rev(y)[:va], rtol=1e-12, atol=1e-12)
