"""On a CUDA GPU: the bf16 grouped_mm fast path against a float64 reference, and factorization
on the device. Skipped where there is no GPU (CI); run on the lent GPU machine."""

import pytest
import torch

from molae.factorize import shared_latent
from molae.layers import Experts, _grouped_mm_supported

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
