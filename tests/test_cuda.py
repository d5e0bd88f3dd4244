"""On a CUDA GPU: the bf16 grouped_mm fast path against a float64 reference, and factorization
on the device. Skipped where there is no GPU (CI); run on the lent GPU machine."""

import pytest
import torch

from molae.factorize import shared_latent
from molae.layers import Experts, _grouped_mm_supported, decode_fits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("latent,groups", [({}, 1), ({"up": 128, "gate": 128}, 1),
                                           ({"up": 64, "gate": 64, "down": 64}, 4)])
def test_bf16_fast_path_on_gpu_matches_float64_reference(latent, groups):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    T, D, F_, E, K = 1024, 256, 128, 16, 4
    ref = Experts(D, F_, E, latent, groups).double()
    gpu = Experts(D, F_, E, latent, groups).cuda().bfloat16()
    with torch.no_grad():
        for p, q in zip(gpu.parameters(), ref.parameters()):
            q.copy_(p.double())  # the reference sees the same bf16-rounded weights
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.rand(T, E, device="cuda").argsort(-1)[:, :K]
    w = torch.rand(T, K, device="cuda").bfloat16()
    assert _grouped_mm_supported(x, gpu.up_A if "up" in latent else gpu.up_proj)
    g = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    out = torch.full((T, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    out.copy_(gpu(xg, idx, w))  # every element written, no NaN left
    out.backward(g)
    xr = x.double().cpu().requires_grad_()
    out_ref = ref.forward_reference(xr, idx.cpu(), w.double().cpu())
    out_ref.backward(g.double().cpu())
    assert torch.isfinite(out).all()
    assert rel(out.cpu(), out_ref) < 1e-2
    assert rel(xg.grad.cpu(), xr.grad) < 1e-2
    for (name, p), q in zip(gpu.named_parameters(), ref.parameters()):
        assert rel(p.grad.cpu(), q.grad) < 2e-2, name


def test_factorization_runs_on_the_gpu_in_float32():
    W = torch.randn(16, 128, 512, device="cuda", dtype=torch.bfloat16)
    A, B = shared_latent(W, 256)
    assert A.device.type == B.device.type == "cuda" and A.dtype == torch.bfloat16
    A64, B64 = shared_latent(W.double().cpu(), 256)
    err = ((W.double().cpu() - A.double().cpu() @ B.double().cpu()).norm() / W.double().norm().cpu()).item()
    best = ((W.double().cpu() - A64 @ B64).norm() / W.double().norm().cpu()).item()
    assert best <= err < best + 5e-3  # optimal up to bf16 rounding of the returned factors


def test_eval_speed_and_analyze_on_the_gpu():
    from molae.analyze import analyze_projection
    from molae.evaluate import efficiency, measure_speed
    from tiny import tiny_model

    model = tiny_model("qwen2_moe", dtype=torch.bfloat16, vocab_size=256, max_position_embeddings=1024).cuda()
    speed = measure_speed(model, prompt_tokens=256, new_tokens=16, repeats=3)
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert 0 < speed["peak_memory_gb"] < 80 and "H" in speed["device"] or "NVIDIA" in speed["device"]
    assert efficiency(model)["weight_bytes"] == 2 * sum(p.numel() for p in model.parameters())
    W = torch.randn(8, 64, 256, device="cuda")
    r = analyze_projection(W)
    assert r["d_for_energy"]["1"]["99"] <= 256 and r["stacked_energy"]["1"]["energy"][-1] == pytest.approx(1)


@pytest.mark.parametrize("S,F_", [(1, 8), (257, 1408), (64, 3000)])
def test_triton_swiglu_matches_reference_forward_and_backward(S, F_):
    from molae.kernels import _SwiGLUWeighted, swiglu_weighted_reference

    g = torch.randn(S, F_, device="cuda", dtype=torch.bfloat16) * 3
    u = torch.randn(S, F_, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(S, device="cuda")
    dh = torch.randn(S, F_, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (_SwiGLUWeighted.apply, swiglu_weighted_reference):
        args = [t.clone().requires_grad_() for t in (g, u, w)]
        h = fn(*args)
        h.backward(dh)
        outs.append([h] + [a.grad for a in args])
    for got, want in zip(*outs):
        assert got.dtype == want.dtype and torch.isfinite(got).all()
        assert rel(got, want) < 1e-2


@pytest.mark.parametrize("latent,groups", [({}, 1), ({"gate": 64, "up": 64, "down": 64}, 1),
                                           ({"gate": 64, "up": 64, "down": 64}, 4)])
def test_fast_path_has_no_host_sync(latent, groups):
    """Forward and backward of the bf16 fast path launch no device-to-host synchronisation
    (so it also captures in a CUDA graph)."""
    experts = Experts(256, 128, 16, latent, groups).cuda().bfloat16()
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.rand(512, 16, device="cuda").argsort(-1)[:, :4]
    w = torch.rand(512, 4, device="cuda", requires_grad=True)
    experts(x, idx, w).sum().backward()  # warm: kernels compiled, allocator primed
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = experts(x, idx, w)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_standard_experts_match_transformers_grouped_mm_on_the_same_weights():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    D, F_, E, K, T = 256, 128, 16, 4, 777
    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F_, num_experts=E, num_experts_per_tok=K,
                         experts_implementation="grouped_mm")
    hf = Qwen3MoeExperts(cfg).cuda().bfloat16()
    torch.nn.init.normal_(hf.gate_up_proj, std=D**-0.5)
    torch.nn.init.normal_(hf.down_proj, std=F_**-0.5)
    ours = Experts(D, F_, E).cuda().bfloat16()
    with torch.no_grad():
        ours.gate_proj.copy_(hf.gate_up_proj[:, :F_])
        ours.up_proj.copy_(hf.gate_up_proj[:, F_:])
        ours.down_proj.copy_(hf.down_proj)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.rand(T, E, device="cuda").argsort(-1)[:, :K]
    w = torch.rand(T, K, device="cuda").softmax(-1).bfloat16()
    assert rel(ours(x, idx, w), hf(x, idx, w)) < 1e-2


def test_triton_zero_idle_experts_writes_only_idle_experts():
    from molae.kernels import zero_idle_experts, zero_idle_experts_reference

    w = torch.randn(7, 33, 1000, device="cuda", dtype=torch.bfloat16)
    w[2] = float("nan")  # what an unwritten gradient may hold
    rows = torch.tensor([3, 0, 0, 5, 1, 0, 2], device="cuda", dtype=torch.int32)
    rows[2] = 0
    want = zero_idle_experts_reference(w.clone(), rows)
    got = zero_idle_experts(w, rows)
    assert got.data_ptr() == w.data_ptr() and torch.equal(got, want)
    assert torch.equal(got[[1, 2, 5]], torch.zeros_like(got[[1, 2, 5]]))


@pytest.mark.parametrize("latent,groups,T", [({}, 1, 1), ({"gate": 256, "up": 256, "down": 256}, 1, 2),
                                             ({"gate": 256, "up": 256, "down": 256}, 1, 4),
                                             ({"gate": 128, "up": 128, "down": 128}, 8, 8),
                                             ({"gate": 192, "up": 192}, 1, 16)])
def test_decode_kernels_on_gpu_match_float64_reference_and_replay_in_a_cuda_graph(latent, groups, T):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    D, F_, E, K = 1024, 384, 64, 8
    gpu = Experts(D, F_, E, latent, groups).cuda().bfloat16().requires_grad_(False)
    ref = Experts(D, F_, E, latent, groups).double()
    with torch.no_grad():
        for p, q in zip(gpu.parameters(), ref.parameters()):
            q.copy_(p.double())

    def inputs():
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        return x, torch.rand(T, E, device="cuda").argsort(-1)[:, :K], torch.rand(T, K, device="cuda").bfloat16()

    x, idx, w = inputs()
    assert gpu._decode_fits(x, idx) == decode_fits(T, K, E, bool(latent), groups)  # else forward_decode called directly
    out = gpu.forward_decode(x, idx, w)
    expect = ref.forward_reference(x.double().cpu(), idx.cpu(), w.double().cpu())
    assert rel(out.cpu(), expect) < 1e-2
    torch.testing.assert_close(out, gpu.forward_fast(x, idx, w), rtol=2e-2, atol=2e-2)
    static = inputs()
    gpu.forward_decode(*static)  # warm (compiles the kernels) before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = gpu.forward_decode(*static)
    for _ in range(2):  # new inputs into the captured buffers: the replay recomputes from them
        x, idx, w = inputs()
        for buf, new in zip(static, (x, idx, w)):
            buf.copy_(new)
        graph.replay()
        torch.testing.assert_close(static_out, gpu.forward_decode(x, idx, w), rtol=0, atol=0)
    compiled = torch.compile(gpu.forward_decode, mode="reduce-overhead")  # the kernels as custom ops, graphed
    for _ in range(3):
        x, idx, w = inputs()
        torch.testing.assert_close(compiled(x, idx, w), gpu.forward_decode(x, idx, w), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["moe", "molae-g1", "molae-g8"])
def test_the_benchmarks_graphed_forward_backward_replays_the_eager_gradients(impl):
    """bench layer's "forward+backward (CUDA graph)": the grouped path's forward and backward captured whole (no host
    sync anywhere in either) and replayed on new inputs copied into the captured set, giving the eager step's
    gradients."""
    from molae.bench.layer import _steps, build, graphed, inputs, parse_shape

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    shape = parse_shape("512,256,16,4")
    module = build(impl, shape, "cuda", torch.bfloat16)
    gen = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    sets = inputs(shape, 256, 1, "cuda", torch.bfloat16, gen)
    step = _steps(module, sets, "forward+backward")
    replay = graphed(step, 1)
    fresh = inputs(shape, 256, 1, "cuda", torch.bfloat16, gen)[0]
    for k, v in fresh.items():  # new inputs into the captured buffers
        sets[0][k].copy_(v)
    replay(0)
    torch.cuda.synchronize()
    got = [p.grad.clone() for p in module.parameters()]
    step(0)  # eager, on the same inputs
    for g, p in zip(got, module.parameters()):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, p.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("molae", [None, {"latent_dim": 64, "groups": 2}])
def test_a_decoder_layer_compiles_into_one_graph_on_the_gpu(molae):
    """The trainer's `compile` on CUDA: one graph per decoder layer (the CUDA-only branches of the experts' path
    included: the device-capability check is a constant under compilation, the alignment check skipped)."""
    from tiny import explain_last_layer

    from molae import train as T

    cfg = T.TrainConfig(family="qwen2_moe", model=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=4, moe_intermediate_size=64,
                                                       shared_expert_intermediate_size=128, num_experts=8,
                                                       num_experts_per_tok=2), molae=molae)
    explained = explain_last_layer(T.build_model(cfg, 512).cuda(), "cuda", tokens=64)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_unaligned_latent_sizes_warn_once_that_they_take_the_slow_fallback():
    m = Experts(256, 128, 8, {"gate": 100, "up": 100}).cuda().bfloat16()  # 100: not a multiple of 8
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    idx, w = torch.rand(64, 8, device="cuda").argsort(-1)[:, :2], torch.rand(64, 2, device="cuda").bfloat16()
    m.impl = "grouped"
    with pytest.warns(UserWarning, match=r"padded batched-matmul fallback.*multiples of 8"):
        m(x, idx, w)


@pytest.mark.parametrize("impl", ["moe", "molae"])
def test_graph_decoder_replays_one_hand_captured_graph_and_decodes_what_generate_decodes(tmp_path, impl):
    """bench generate's graph loop on CUDA: the compiled step captured once into a torch.cuda.CUDAGraph (each
    token one replay), its tokens those of transformers' eager generate, twice (cache and buffers reset), and for a
    shorter run (captured again: the output buffer's length changed). float32: bf16 rounding differences between
    compiled and eager kernels can flip the argmax of a random tiny model's near-flat logits."""
    from tiny import tiny_model

    from molae.bench.generate import GraphDecoder, build, greedy

    tiny_model("qwen3_moe", dtype=torch.float32).save_pretrained(tmp_path / "src")
    model = build(str(tmp_path / "src"), impl, "cuda", torch.float32, 0.5)
    gen = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=gen, device="cuda")
    decode = GraphDecoder(model, 8 + 6, compile_=True)
    with torch.no_grad():
        want = greedy(model, ids, 6, compile_=False)[:, 8:]
        for new in (6, 4):
            assert torch.equal(decode(ids, new), want[:, :new]) and torch.equal(decode(ids, new), want[:, :new])
            assert isinstance(decode.graph, torch.cuda.CUDAGraph) and decode.bufs[3].shape == (2, new)
