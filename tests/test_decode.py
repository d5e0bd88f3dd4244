"""The decode path (few tokens): molae.kernels' decode GEMVs against their references, and Experts'
forward_decode against forward_reference on fresh random inputs. Here the kernels' PyTorch references run
(no CUDA); `test_triton_kernels_under_the_interpreter` runs tests/triton_interpreted.py in a subprocess under
Triton's CPU interpreter, so the Triton kernels' indexing, masks and sums are checked without a GPU, and
`test_triton_kernels_compile_for_hopper` compiles every kernel to an sm_90 binary (Triton's compiler and ptxas,
no GPU needed), which the interpreter does not; tests/test_cuda.py checks them on a GPU, in bf16, and under
CUDA-graph capture."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from molae.layers import FUSED_SUM_TOKENS, Experts, MoE, MoEConfig, decode_fits

CASES = [({}, 1, False), ({"gate": 8, "up": 8}, 1, False), ({"gate": 8, "up": 6, "down": 5}, 4, True),
         ({"up": 7, "down": 9}, 2, False), ({"down": 6}, 8, True)]


def random_call(T, D=32, E=8, K=3, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed)
    x = torch.randn(T, D, generator=g, dtype=dtype)
    idx = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
    return x, idx, torch.rand(T, K, generator=g, dtype=dtype)


@pytest.mark.parametrize("latent,groups,permuted", CASES)
@pytest.mark.parametrize("T", [1, 5])
def test_decode_path_matches_the_reference(latent, groups, permuted, T):
    m = Experts(32, 24, 8, latent, groups, permuted=permuted).double()
    if permuted:
        m.expert_slot.copy_(torch.randperm(8))
    x, idx, w = random_call(T)
    with torch.no_grad():
        torch.testing.assert_close(m.forward_decode(x, idx, w), m.forward_reference(x, idx, w))


@pytest.mark.parametrize("T,down_ops", [(FUSED_SUM_TOKENS, ("slot_group_sum",)),
                                         (FUSED_SUM_TOKENS + 1, ("slot_sum", "group_sum"))])
def test_decode_path_compiles_with_its_kernels_as_custom_ops(T, down_ops):
    m = Experts(32, 24, 8, {"gate": 8, "up": 8, "down": 6}, 2).double()
    x, idx, w = random_call(T)
    graphs = []

    def backend(gm, example_inputs):  # keeps the captured graph, then runs it as is
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(m.forward_decode, fullgraph=True, backend=backend)  # no graph break
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, idx, w), m.forward_reference(x, idx, w))
    code = graphs[0].code
    for op in ("group_gemv_pair", "slot_swiglu", *down_ops):  # each kernel one opaque op in the graph, the down
        # projection fused up to FUSED_SUM_TOKENS tokens
        assert f"torch.ops.molae.{op}" in code, op
    with torch.no_grad():  # and inductor compiles around them
        torch.testing.assert_close(torch.compile(m.forward_decode)(x, idx, w), m.forward_reference(x, idx, w))


def test_decode_refuses_gradients_and_fast_takes_it_only_where_it_fits():
    m = Experts(32, 24, 8, {"gate": 8, "up": 8}).double()
    x, idx, w = random_call(2)
    m.impl = "decode"
    with pytest.raises(ValueError, match=r"impl='decode' has no backward: run it under torch.no_grad\(\)"):
        m(x, idx, w)
    with torch.no_grad():
        assert not m._decode_fits(x, idx)  # no Triton on CPU tensors outside the interpreter
        m.impl = "grouped"
        torch.testing.assert_close(m(x, idx, w), m.forward_reference(x, idx, w))
    layer = MoE(MoEConfig(32, 24, 8, 3))
    for impl in ("fast", "grouped", "decode", "reference"):
        layer.impl = impl
        assert layer.experts.impl == impl
    # standard layers: up to as many slots as experts; latent ones also at most 16 tokens (8 with groups)
    assert decode_fits(4, 2, 8, latent=False) and not decode_fits(5, 2, 8, latent=False)
    assert decode_fits(32, 8, 256, latent=False) and not decode_fits(32, 8, 256, latent=True)
    assert decode_fits(16, 8, 256, latent=True) and not decode_fits(16, 8, 256, latent=True, groups=8)
    assert decode_fits(8, 8, 256, latent=True, groups=8) and not decode_fits(16, 8, 60, latent=True)


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "triton_interpreted.py")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=here.parent, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def test_triton_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from molae import kernels as K

    i32, i64 = "i32", "*i64"
    rows = dict(BLOCK_R=K.BLOCK_ROWS, BLOCK_I=K.BLOCK_IN)
    for dt in ("bf16", "fp32"):
        p = f"*{dt}"
        split = dict(split=i32, chunk=i32)
        cases = {
            "_group_gemv": (dict(x_ptr=p, Wa_ptr=p, Wb_ptr=p, slot_ptr=i64, z_ptr=p, n_in=i32, R=i32, per_group=i32,
                                 K=i32, **split, kinds=i32), dict(rows, BLOCK_K=8)),
            **{f"_slot_swiglu:{one}": (dict(zg_ptr=p, zu_ptr=p, Wg_ptr=p, Wu_ptr=p, slot_ptr=i64, w_ptr="*fp32",
                                            h_ptr=p, K=i32, F_=i32, Gg=i32, Ig=i32, Gu=i32, Iu=i32, per_g=i32,
                                            per_u=i32), dict(rows, ONE_LOOP=one))
               for one in (False, True)},  # both values of SWIGLU_ONE_LOOP
            "_slot_gemv": (dict(h_ptr=p, W_ptr=p, slot_ptr=i64, y_ptr="*fp32", S=i32, R=i32, F_=i32, **split), rows),
            "_group_reduce": (dict(y_ptr="*fp32", slot_ptr=i64, u_ptr=p, S=i32, K=i32, R=i32, per_group=i32,
                                   split=i32), dict(BLOCK=K.BLOCK_REDUCE, BLOCK_K=8)),
            "_group_sum": (dict(u_ptr=p, W_ptr=p, slot_ptr=i64, y_ptr=p, G=i32, n_in=i32, R=i32, per_group=i32, K=i32,
                                **split), dict(rows, BLOCK_K=8)),
            "_group_sum_slots": (dict(y_ptr="*fp32", W_ptr=p, slot_ptr=i64, out_ptr=p, S=i32, G=i32, n_in=i32, R=i32,
                                      per_group=i32, K=i32, split_y=i32, **split), dict(rows, BLOCK_K=8)),
            "_add_split": (dict(parts_ptr="*fp32", out_ptr=p, n=i32, split=i32), dict(BLOCK=K.BLOCK_REDUCE)),
            "_swiglu_fwd": (dict(gate_ptr=p, up_ptr=p, w_ptr="*fp32", h_ptr=p, F_=i32), dict(BLOCK=K.BLOCK_F)),
            "_swiglu_bwd": (dict(gate_ptr=p, up_ptr=p, w_ptr="*fp32", dh_ptr=p, dgate_ptr=p, dup_ptr=p, dw_ptr="*fp32",
                                 F_=i32), dict(BLOCK=K.BLOCK_F)),
            "_zero_idle": (dict(w_ptr=p, rows_ptr=i64, n=i32), dict(BLOCK=K.BLOCK_ZERO)),
        }
        for name, (sig, const) in cases.items():
            kernel = getattr(K, name.partition(":")[0])
            src = ASTSource(fn=kernel, signature={**sig, **dict.fromkeys(const, "constexpr")}, constexprs=const)
            binary = compile(src, target=GPUTarget("cuda", 90, 32))
            assert len(binary.asm["cubin"]) > 1000, (name, dt)


def test_decode_gemvs_split_their_dot_products_only_where_one_token_would_leave_sms_idle():
    pytest.importorskip("triton")
    from molae.kernels import SPLIT_MIN_IN, _split

    cpu = torch.device("cpu")  # counted as 132 SMs (an H100 or H200)
    assert _split(48, 2048, cpu) == 2048 // SPLIT_MIN_IN  # Qwen3-30B-A3B's shared gate at one token: 48 programs
    assert _split(128, 7168, cpu) == 5  # DeepSeek-V3's: 128 programs -> 640, four or more per SM
    assert _split(8 * 448, 2048, cpu) == 1  # enough programs already
    assert _split(2, 300, cpu) == 1  # too few columns to split
