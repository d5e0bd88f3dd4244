"""Run by tests/test_decode.py in a subprocess with TRITON_INTERPRET=1: the Triton kernels of molae.kernels
executed by Triton's CPU interpreter on CPU tensors, against their references on fresh random inputs.
Sizes are not multiples of the kernels' blocks, so every mask is exercised."""

import os

import pytest
import torch

from molae import kernels as K
from molae.layers import FUSED_SUM_TOKENS, Experts

assert os.environ.get("TRITON_INTERPRET") == "1" and K.INTERPRET, "run me with TRITON_INTERPRET=1"


def rng():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def slots(T, E, Kk, g):
    return torch.rand(T, E, generator=g).argsort(-1)[:, :Kk]


@pytest.mark.parametrize("T,G,per,R,n_in", [(1, 1, 8, 17, 200), (3, 4, 2, 40, 33), (2, 8, 4, 5, 129),
                                             (1, 2, 4, 17, 700)])  # the last splits its dot products
def test_group_gemv(T, G, per, R, n_in):
    g = rng()
    x, W = torch.randn(T, n_in, generator=g), torch.randn(G, R, n_in, generator=g)
    s = slots(T, G * per, 3, g)
    z, ref = K.group_gemv(x, W, s, per), K.group_gemv_reference(x, W, s, per)
    used = K._groups_of(s, per, G)  # rows of unused groups are left unwritten
    torch.testing.assert_close(z[used], ref[used], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T,G,per,R,n_in", [(2, 4, 2, 21, 70), (1, 1, 8, 9, 600)])  # the last splits
def test_group_gemv_pair(T, G, per, R, n_in):
    g = rng()
    x, Wa, Wb = torch.randn(T, n_in, generator=g), torch.randn(G, R, n_in, generator=g), torch.randn(G, R, n_in,
                                                                                                   generator=g)
    s = slots(T, G * per, 3, g)
    z, ref = K.group_gemv_pair(x, Wa, Wb, s, per), K.group_gemv_pair_reference(x, Wa, Wb, s, per)
    used = K._groups_of(s, per, G)
    assert z.shape == (2, T, G, R)
    torch.testing.assert_close(z[:, used], ref[:, used], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z[1][used], K.group_gemv(x, Wb, s, per)[used], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,Kk,E,F_,Ig,Iu,Gg,Gu", [(1, 8, 16, 37, 130, 130, 1, 1), (4, 3, 8, 20, 9, 64, 4, 1),
                                                    (2, 2, 6, 16, 33, 17, 3, 2)])
@pytest.mark.parametrize("one_loop", [False, True])  # SWIGLU_ONE_LOOP: gate and up in one loop (Ig != Iu too)
def test_slot_swiglu(T, Kk, E, F_, Ig, Iu, Gg, Gu, one_loop, monkeypatch):
    monkeypatch.setattr(K, "SWIGLU_ONE_LOOP", one_loop)
    g = rng()
    zg, zu = torch.randn(T, Gg, Ig, generator=g), torch.randn(T, Gu, Iu, generator=g)
    Wg, Wu = torch.randn(E, F_, Ig, generator=g), torch.randn(E, F_, Iu, generator=g)
    s, w = slots(T, E, Kk, g), torch.rand(T, Kk, generator=g)
    args = (zg, zu, Wg, Wu, s, w, E // Gg, E // Gu)
    torch.testing.assert_close(K.slot_swiglu(*args), K.slot_swiglu_reference(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T,Kk,E,G,R,F_", [(1, 8, 16, 1, 19, 130), (3, 4, 8, 4, 40, 20), (2, 3, 12, 12, 7, 16),
                                           (1, 3, 12, 4, 7, 600), (1, 2, 8, 1, 530, 30)])  # split: F, R
def test_slot_sum_and_group_sum(T, Kk, E, G, R, F_):
    g = rng()
    h, W = torch.randn(T * Kk, F_, generator=g), torch.randn(E, R, F_, generator=g)
    s = slots(T, E, Kk, g)
    u = K.slot_sum(h, W, s, E // G, G)
    torch.testing.assert_close(u, K.slot_sum_reference(h, W, s, E // G, G), rtol=1e-4, atol=1e-4)
    B = torch.randn(G, 23, R, generator=g)
    torch.testing.assert_close(K.group_sum(u, B, s, E // G), K.group_sum_reference(u, B, s, E // G),
                               rtol=1e-4, atol=1e-4)


def test_slot_sum_wide_keeps_the_latent_sum_in_float32_and_group_sum_returns_the_weights_dtype():
    """forward_decode's two-step down projection in bf16: u in float32 (as slot_group_sum keeps it), y in B's dtype,
    both against their references."""
    g = rng()
    T, Kk, E, G, R, F_ = 3, 4, 8, 2, 40, 20
    h, W = torch.randn(T * Kk, F_, generator=g).bfloat16(), torch.randn(E, R, F_, generator=g).bfloat16()
    s = slots(T, E, Kk, g)
    u = K.slot_sum(h, W, s, E // G, G, True)
    assert u.dtype == torch.float32 and K.slot_sum(h, W, s, E // G, G).dtype == torch.bfloat16
    torch.testing.assert_close(u, K.slot_sum_reference(h, W, s, E // G, G, True), rtol=1e-4, atol=1e-4)
    B = torch.randn(G, 23, R, generator=g).bfloat16()
    y = K.group_sum(u, B, s, E // G)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, K.group_sum_reference(u, B, s, E // G), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("T,Kk,E,G,L,F_,D", [(1, 8, 16, 1, 19, 130, 23), (3, 4, 8, 4, 40, 20, 17),
                                               (2, 3, 12, 12, 7, 16, 9), (1, 3, 12, 4, 7, 600, 5),
                                               (1, 2, 8, 1, 530, 30, 33), (1, 8, 8, 2, 300, 40, 1100)])  # splits
def test_slot_group_sum(T, Kk, E, G, L, F_, D):
    g = rng()
    h, A = torch.randn(T * Kk, F_, generator=g), torch.randn(E, L, F_, generator=g)
    B = torch.randn(G, D, L, generator=g)
    s = slots(T, E, Kk, g)
    y, ref = K.slot_group_sum(h, A, B, s, E // G), K.slot_group_sum_reference(h, A, B, s, E // G)
    tol = 1e-5 * float(ref.abs().max())  # float32 sums of up to 600 x 530 products: rounding scales with them
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=tol)
    two_step = K.group_sum_reference(K.slot_sum_reference(h, A, s, E // G, G), B, s, E // G)  # what it fuses
    torch.testing.assert_close(y, two_step, rtol=1e-4, atol=tol)


@pytest.mark.parametrize("latent,groups,permuted", [({}, 1, False), ({"gate": 8, "up": 8}, 1, False),
                                                    ({"gate": 8, "up": 6, "down": 5}, 4, True),
                                                    ({"up": 7, "down": 9}, 2, False)])
def test_experts_decode_path(latent, groups, permuted):
    g = rng()
    m = Experts(32, 24, 8, latent, groups, permuted=permuted)
    if permuted:
        m.expert_slot.copy_(torch.randperm(8, generator=g))
    x, idx, w = torch.randn(2, 32, generator=g), slots(2, 8, 3, g), torch.rand(2, 3, generator=g)
    with torch.no_grad():
        assert m._decode_fits(x, idx)  # "fast" takes the decode kernels here (6 slots, 8 experts)
        out = m(x, idx, w)
        torch.testing.assert_close(out, m.forward_reference(x, idx, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T", [FUSED_SUM_TOKENS, FUSED_SUM_TOKENS + 1])  # down fused, then two kernels
def test_each_decode_kernels_own_launch_constants_compute_the_same_layer(T, monkeypatch):
    """LAUNCH_OVERRIDES (decode_sweep.py --per-kernel): every decode kernel at launch constants of its own, other
    than the shared ones, still computes the layer (rows, columns and splits all change)."""
    g = rng()
    m = Experts(300, 40, 8, {"gate": 24, "up": 24, "down": 20}, 2)
    x, idx, w = torch.randn(T, 300, generator=g), slots(T, 8, 2, g), torch.rand(T, 2, generator=g)
    with torch.no_grad():
        shared = m.forward_decode(x, idx, w)
        monkeypatch.setattr(K, "LAUNCH_OVERRIDES", {k: (8, 128, 8) for k in K.DECODE_KERNELS})
        own = m.forward_decode(x, idx, w)
        torch.testing.assert_close(own, m.forward_reference(x, idx, w), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(own, shared, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("S,F_", [(1, 8), (5, 1100)])
def test_swiglu_forward_and_backward(S, F_):
    g = rng()
    gate, up = torch.randn(S, F_, generator=g, requires_grad=True), torch.randn(S, F_, generator=g, requires_grad=True)
    w, dh = torch.rand(S, generator=g, requires_grad=True), torch.randn(S, F_, generator=g)
    grads = []
    for fn in (K._SwiGLUWeighted.apply, K.swiglu_weighted_reference):
        out = fn(gate, up, w)
        grads.append((out, *torch.autograd.grad(out, (gate, up, w), dh)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_zero_idle_experts():
    g = rng()
    W, rows = torch.randn(5, 3, 7, generator=g), torch.tensor([0, 2, 0, 1, 0])
    torch.testing.assert_close(K.zero_idle_experts(W.clone(), rows), K.zero_idle_experts_reference(W, rows))


def test_bench_layer_times_the_decode_kernels_beside_the_grouped_path():
    from molae.bench.layer import Shape, bench_layer

    result = bench_layer([Shape("tiny", 64, 32, 8, 2)], ["moe", "molae-g1"], [], [1, 40], "cpu", torch.float32,
                         sets=2, peak_size=32)
    rows = {(r["impl"], r["tokens"], r["path"]) for r in result["rows"] if r["mode"] == "decode"}
    assert rows == {(i, T, p) for i in ("moe", "molae-g1") for T, p in ((1, "decode"), (40, "grouped"))} | {
        (f"{i}/{p}", T, p) for i in ("moe", "molae-g1")
        for T, p in ((1, "grouped"), (40, "decode"))}  # 40 tokens: 80 slots, 8 experts
