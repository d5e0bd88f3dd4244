"""Fused kernels of the expert path (Triton on CUDA; the reference everywhere else).
Each fast function has a `_reference` twin with the same signature and result.

Shape legend: T tokens; K experts per token; S routed (token, expert) slots (sorted by expert for the
grouped GEMMs, token-major t*K+k for the decode kernels); E experts; G expert groups; F expert
intermediate size; I a GEMV's input size (D, or a latent size L); R its output rows.

swiglu_weighted(gate_SF, up_SF, w_S) = silu(gate) * up * w[:, None], computed in float32 (or
wider) and returned in gate's dtype. Folding the routing weight into the SwiGLU means the routed outputs
can be summed per token (in latent space for MoLAE) with no weighting pass of their own; done
unfused in PyTorch the three products are three passes over [S, F], the kernel is one (two
reads, one write), and its backward is one pass that also reduces the weight's gradient per row.

The decode kernels (few tokens: T*K small) read each needed weight once, straight from the stacked [E, ...]
and [G, ...] tensors by the router's expert ids, with no sort, no gather of weights and no host sync, so a
decode step is four launches where gate and up share a latent size and down is factorized (slot_group_sum is
two; one more per GEMV that splits, below), that CUDA graphs can capture:
  group_gemv(x_TI, W_GRI, slot_TK, per_group)    -> z [T, G, R]: W_g x_t for the groups g t's experts are in
  group_gemv_pair(x_TI, Wa, Wb, slot_TK, per_group) -> [2, T, G, R]: the same for gate's and up's B in one launch
  slot_swiglu(zg, zu, Wg_EFI, Wu_EFI, slot_TK, w_TK, per_g, per_u) -> h [T*K, F]: silu(Wg_e zg) * (Wu_e zu) * w
  slot_sum(h_SF, W_ERF, slot_TK, per_group, G)  -> u [T, G, R]: sum over t's slots in group g of W_e h
  group_sum(u_TGI, W_GRI, slot_TK, per_group)   -> y [T, R]: sum over t's groups of W_g u_tg
  slot_group_sum(h_SF, A_ERF, B_GDR, slot_TK, per_group) -> y [T, D]: group_sum(slot_sum(h, A)) with u never
                                                   written (the decode path's factorized down projection)
A whole (unfactorized) kind is the same GEMV with one "group" holding every expert (per_group = E). Where one
token's GEMV would leave most SMs idle, group_gemv, slot_sum and group_sum split their dot products into pieces
(float32 partial sums, added and cast by one more launch: `_split`). Rows
of z and u for groups a token does not use are left unwritten: nothing reads them. Each is also a torch custom
op (torch.ops.molae.NAME), called inside torch.compile so that the compiled graph keeps the kernel whole.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def _wide(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # the references accumulate in float32 or wider


def swiglu_weighted_reference(gate_SF: torch.Tensor, up_SF: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """Slow and obvious: silu(gate) * up * w per row, in float32 (or wider), cast back to gate's dtype."""
    dt = _wide(gate_SF)
    return (F.silu(gate_SF.to(dt)) * up_SF.to(dt) * w_S.to(dt)[:, None]).to(gate_SF.dtype)


def swiglu_weighted(gate_SF: torch.Tensor, up_SF: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * w[:, None]: the Triton kernel where it runs (CUDA, not inside torch.compile,
    which fuses the reference itself), else the reference. Same signature and result either way."""
    if triton_ok(gate_SF) and gate_SF.dim() == 2 and not torch.compiler.is_compiling():
        return _SwiGLUWeighted.apply(gate_SF, up_SF, w_S)
    return swiglu_weighted_reference(gate_SF, up_SF, w_S)


def zero_idle_experts_reference(w_EOI: torch.Tensor, rows_E: torch.Tensor) -> torch.Tensor:
    """w with the matrices of experts that received no rows set to zero (a full pass)."""
    return torch.where((rows_E > 0)[:, None, None], w_EOI, torch.zeros((), dtype=w_EOI.dtype, device=w_EOI.device))


def zero_idle_experts(w_EOI: torch.Tensor, rows_E: torch.Tensor) -> torch.Tensor:
    """zero_idle_experts_reference, in place where Triton runs: only idle experts' matrices are written
    (the grouped weight-gradient kernel leaves them unwritten), so the cost is theirs, not all E's."""
    if not (triton_ok(w_EOI) and w_EOI.is_contiguous()) or torch.compiler.is_compiling():
        return zero_idle_experts_reference(w_EOI, rows_E)
    E, n = w_EOI.shape[0], w_EOI[0].numel()
    _zero_idle[(E, triton.cdiv(n, BLOCK_ZERO))](w_EOI, rows_E.contiguous(), n, BLOCK=BLOCK_ZERO)
    return w_EOI


def triton_ok(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run on x: CUDA, or any device under Triton's interpreter
    (TRITON_INTERPRET=1, set before import: how the CPU tests check the kernels' logic)."""
    return triton is not None and (x.is_cuda or INTERPRET)


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- decode kernels

def _groups_of(slot_TK: torch.Tensor, per_group: int, G: int) -> torch.Tensor:
    """[T, G] bool: whether token t has an expert slot in group g."""
    return F.one_hot(slot_TK // per_group, G).any(1)


def group_gemv_reference(x_TI, W_GRI, slot_TK, per_group: int):
    """z[t, g] = W[g] @ x[t] for every group (the unused groups' rows too)."""
    dt = _wide(x_TI)
    return torch.einsum("gri,ti->tgr", W_GRI.to(dt), x_TI.to(dt)).to(x_TI.dtype)


def group_gemv_pair_reference(x_TI, Wa_GRI, Wb_GRI, slot_TK, per_group: int):
    """z[0], z[1] = group_gemv of x with Wa and with Wb (gate's and up's shared projections): [2, T, G, R]."""
    return torch.stack([group_gemv_reference(x_TI, W, slot_TK, per_group) for W in (Wa_GRI, Wb_GRI)])


def slot_swiglu_reference(zg_TGI, zu_TJI, Wg_EFI, Wu_EFJ, slot_TK, w_TK, per_g: int, per_u: int):
    """h[t*K+k] = silu(Wg[e] zg[t, e // per_g]) * (Wu[e] zu[t, e // per_u]) * w[t, k], e = slot[t, k]."""
    T, K = slot_TK.shape
    dt = _wide(zg_TGI)
    e = slot_TK.reshape(-1).long()
    t = torch.arange(T, device=e.device).repeat_interleave(K)
    g = torch.einsum("sfi,si->sf", Wg_EFI.to(dt)[e], zg_TGI.to(dt)[t, e // per_g])
    u = torch.einsum("sfj,sj->sf", Wu_EFJ.to(dt)[e], zu_TJI.to(dt)[t, e // per_u])
    return (F.silu(g) * u * w_TK.reshape(-1, 1).to(dt)).to(zg_TGI.dtype)


def _sum_dtype(dtype: torch.dtype, wide: bool) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if wide else dtype


def slot_sum_reference(h_SF, W_ERF, slot_TK, per_group: int, G: int, wide: bool = False):
    """u[t, g] = sum over k with slot[t, k] in group g of W[slot[t, k]] @ h[t*K+k] (zero where none); in float32
    where wide and h is narrower (a latent sum on its way to one more product), else in h's dtype."""
    T, K = slot_TK.shape
    dt = _wide(h_SF)
    e = slot_TK.reshape(-1).long()
    y_SR = torch.einsum("srf,sf->sr", W_ERF.to(dt)[e], h_SF.to(dt))
    onehot_TKG = F.one_hot(slot_TK.long() // per_group, G).to(dt)
    return torch.einsum("tkg,tkr->tgr", onehot_TKG, y_SR.view(T, K, -1)).to(_sum_dtype(h_SF.dtype, wide))


def group_sum_reference(u_TGI, W_GRI, slot_TK, per_group: int):
    """y[t] = sum over the groups g that t uses of W[g] @ u[t, g], in W's dtype."""
    used_TG = _groups_of(slot_TK.long(), per_group, W_GRI.shape[0])
    u = torch.where(used_TG[..., None], u_TGI.to(_wide(u_TGI)), 0.0)  # rows of unused groups may hold anything
    return torch.einsum("gri,tgi->tr", W_GRI.to(u.dtype), u).to(W_GRI.dtype)


def slot_group_sum_reference(h_SF, A_ERF, B_GDR, slot_TK, per_group: int):
    """y[t] = sum over t's groups g of B[g] @ (sum over k with slot[t, k] in g of A[slot[t, k]] @ h[t*K+k]):
    group_sum(slot_sum(...)) with nothing rounded between (sum_g B_g sum_(k in g) y_k = sum_k B_g(k) y_k)."""
    T, K = slot_TK.shape
    dt = _wide(h_SF)
    e = slot_TK.reshape(-1).long()
    y_TKR = torch.einsum("srf,sf->sr", A_ERF.to(dt)[e], h_SF.to(dt)).view(T, K, -1)
    return torch.einsum("tkdr,tkr->td", B_GDR.to(dt)[slot_TK.long() // per_group], y_TKR).to(h_SF.dtype)


def _split(programs: int, n_in: int, device) -> int:
    """How many pieces a decode GEMV splits its input (dot-product) dimension into: enough that about
    SPLIT_PROGRAMS_PER_SM programs per SM stream weights (one token's GEMV has only R / BLOCK_ROWS programs
    otherwise: 48 at Qwen3-30B-A3B's d = 768, under one per SM, which leaves most of the memory bandwidth unused),
    with at least SPLIT_MIN_IN input columns each. Partial sums go to a float32 buffer summed after the kernel."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    return max(1, min(triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, max(programs, 1)), n_in // SPLIT_MIN_IN))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_out(shape, split: int, dtype, device):
    """(the buffer a split kernel writes, how to finish it): the output itself, or float32 pieces [split, *shape]
    that one more launch adds up in a fixed order and casts."""
    if split == 1:
        return torch.empty(shape, dtype=dtype, device=device), lambda out: out
    return torch.empty((split, *shape), dtype=torch.float32, device=device), lambda out: _add_pieces(out, dtype)


def _add_pieces(parts: torch.Tensor, dtype) -> torch.Tensor:
    out = torch.empty(parts.shape[1:], dtype=dtype, device=parts.device)
    n = out.numel()
    _add_split[(triton.cdiv(n, BLOCK_REDUCE),)](parts, out, n, parts.shape[0], BLOCK=BLOCK_REDUCE)
    return out


def _block_k(slot_TK: torch.Tensor) -> int:
    """The kernels' vector width over a token's K slots (a power of two, at least K)."""
    return triton.next_power_of_2(slot_TK.shape[1])


def _chunk(n_in: int, split: int, block_in: int) -> int:
    return triton.cdiv(triton.cdiv(n_in, split), block_in) * block_in


def _launch(kernel: str) -> tuple[int, int, int]:
    """(output rows per program, input columns per step, warps) of a decode kernel: LAUNCH_OVERRIDES' entry, else
    the shared BLOCK_ROWS, BLOCK_IN, GEMV_WARPS."""
    return LAUNCH_OVERRIDES.get(kernel, (BLOCK_ROWS, BLOCK_IN, GEMV_WARPS))


def _gemv_kinds(x_TI: torch.Tensor, Ws: tuple, slot_TK: torch.Tensor, per_group: int) -> torch.Tensor:
    """[len(Ws), T, G, R]: group_gemv of x with each W of Ws (one or two, the same shape), in one launch."""
    (T, n_in), (G, R, _) = x_TI.shape, Ws[0].shape
    rows, block_in, warps = _launch("group_gemv")
    blocks = triton.cdiv(R, rows)
    split = _split(T * G * blocks * len(Ws), n_in, x_TI.device)
    z, finish = _split_out((len(Ws), T, G, R), split, x_TI.dtype, x_TI.device)
    Wa, Wb = Ws[0].contiguous(), Ws[-1].contiguous()
    _group_gemv[(T, G, len(Ws) * blocks * split)](
        x_TI.contiguous(), Wa, Wb, slot_TK.contiguous(), z, n_in, R, per_group, slot_TK.shape[1], split,
        _chunk(n_in, split, block_in), len(Ws), BLOCK_R=rows, BLOCK_I=block_in, BLOCK_K=_block_k(slot_TK),
        num_warps=warps)
    return finish(z)


def _group_gemv_call(x_TI: torch.Tensor, W_GRI: torch.Tensor, slot_TK: torch.Tensor, per_group: int) -> torch.Tensor:
    if not triton_ok(x_TI):
        return group_gemv_reference(x_TI, W_GRI, slot_TK, per_group)
    return _gemv_kinds(x_TI, (W_GRI,), slot_TK, per_group)[0]


def _group_gemv_pair_call(x_TI: torch.Tensor, Wa_GRI: torch.Tensor, Wb_GRI: torch.Tensor, slot_TK: torch.Tensor,
                          per_group: int) -> torch.Tensor:
    if not triton_ok(x_TI):
        return group_gemv_pair_reference(x_TI, Wa_GRI, Wb_GRI, slot_TK, per_group)
    return _gemv_kinds(x_TI, (Wa_GRI, Wb_GRI), slot_TK, per_group)


def _slot_swiglu_call(zg_TGI: torch.Tensor, zu_TJI: torch.Tensor, Wg_EFI: torch.Tensor, Wu_EFJ: torch.Tensor,
                      slot_TK: torch.Tensor, w_TK: torch.Tensor, per_g: int, per_u: int) -> torch.Tensor:
    if not triton_ok(zg_TGI):
        return slot_swiglu_reference(zg_TGI, zu_TJI, Wg_EFI, Wu_EFJ, slot_TK, w_TK, per_g, per_u)
    T, K = slot_TK.shape
    F_ = Wg_EFI.shape[1]
    h = torch.empty(T * K, F_, dtype=zg_TGI.dtype, device=zg_TGI.device)
    zg, zu = zg_TGI.contiguous(), zu_TJI.contiguous()
    rows, block_in, warps = _launch("slot_swiglu")
    _slot_swiglu[(T * K, triton.cdiv(F_, rows))](
        zg, zu, Wg_EFI.contiguous(), Wu_EFJ.contiguous(), slot_TK.contiguous(), w_TK.contiguous(), h, K, F_,
        zg.shape[1], zg.shape[2], zu.shape[1], zu.shape[2], per_g, per_u, BLOCK_R=rows, BLOCK_I=block_in,
        ONE_LOOP=SWIGLU_ONE_LOOP, num_warps=warps)
    return h


def _slot_gemvs(h_SF: torch.Tensor, W_ERF: torch.Tensor, slot_TK: torch.Tensor):
    """Every slot's GEMV W_e h_s in one launch (one program per slot and block of rows, split along F where that
    leaves the GPU idle): (float32 pieces [split, S, R], the slots contiguous, split)."""
    S = slot_TK.numel()
    R, F_ = W_ERF.shape[1:]
    rows, block_in, warps = _launch("slot_gemv")
    blocks = triton.cdiv(R, rows)
    split = _split(S * blocks, F_, h_SF.device)
    y = torch.empty(split, S, R, dtype=torch.float32, device=h_SF.device)
    slot = slot_TK.contiguous()
    _slot_gemv[(S, blocks * split)](h_SF.contiguous(), W_ERF.contiguous(), slot, y, S, R, F_, split,
                                    _chunk(F_, split, block_in), BLOCK_R=rows, BLOCK_I=block_in, num_warps=warps)
    return y, slot, split


def _slot_sum_call(h_SF: torch.Tensor, W_ERF: torch.Tensor, slot_TK: torch.Tensor, per_group: int,
                   G: int, wide: bool = False) -> torch.Tensor:
    """Two launches: every slot's GEMV W_e h_s in parallel (float32 [S, R]; one program per slot and block of
    rows, split along F where that leaves the GPU idle), then each token's slots summed per group in a fixed
    order (no atomics: the same sum every run)."""
    if not triton_ok(h_SF):
        return slot_sum_reference(h_SF, W_ERF, slot_TK, per_group, G, wide)
    T, K = slot_TK.shape
    R = W_ERF.shape[1]
    y, slot, split = _slot_gemvs(h_SF, W_ERF, slot_TK)
    u = torch.empty(T, G, R, dtype=_sum_dtype(h_SF.dtype, wide), device=h_SF.device)
    _group_reduce[(T, G, triton.cdiv(R, BLOCK_REDUCE))](y, slot, u, T * K, K, R, per_group, split,
                                                         BLOCK=BLOCK_REDUCE, BLOCK_K=_block_k(slot_TK))
    return u


def _slot_group_sum_call(h_SF: torch.Tensor, A_ERF: torch.Tensor, B_GDR: torch.Tensor, slot_TK: torch.Tensor,
                         per_group: int) -> torch.Tensor:
    """Two launches (three where the second splits): every slot's GEMV A_e h_s (slot_sum's first), then per token
    and block of output rows the latent sums u_tg of its slots' pieces read straight from those float32 partials
    and multiplied by B_g (slot_sum's reduction and group_sum in one kernel; u never goes to memory)."""
    if not triton_ok(h_SF):
        return slot_group_sum_reference(h_SF, A_ERF, B_GDR, slot_TK, per_group)
    T, K = slot_TK.shape
    L = A_ERF.shape[1]
    G, D = B_GDR.shape[:2]
    y, slot, split_y = _slot_gemvs(h_SF, A_ERF, slot_TK)
    rows, block_in, warps = _launch("group_sum_slots")
    blocks = triton.cdiv(D, rows)
    split = _split(T * blocks, L, h_SF.device)
    out, finish = _split_out((T, D), split, h_SF.dtype, h_SF.device)
    _group_sum_slots[(T, blocks * split)](y, B_GDR.contiguous(), slot, out, T * K, G, L, D, per_group, K, split_y,
                                          split, _chunk(L, split, block_in), BLOCK_R=rows, BLOCK_I=block_in,
                                          BLOCK_K=_block_k(slot_TK), num_warps=warps)
    return finish(out)


def _group_sum_call(u_TGI: torch.Tensor, W_GRI: torch.Tensor, slot_TK: torch.Tensor, per_group: int) -> torch.Tensor:
    if not triton_ok(u_TGI):
        return group_sum_reference(u_TGI, W_GRI, slot_TK, per_group)
    T, G, n_in = u_TGI.shape
    R = W_GRI.shape[1]
    rows, block_in, warps = _launch("group_sum")
    blocks = triton.cdiv(R, rows)
    split = _split(T * blocks, n_in, u_TGI.device)
    y, finish = _split_out((T, R), split, W_GRI.dtype, u_TGI.device)
    _group_sum[(T, blocks * split)](
        u_TGI.contiguous(), W_GRI.contiguous(), slot_TK.contiguous(), y, G, n_in, R, per_group,
        slot_TK.shape[1], split, _chunk(n_in, split, block_in), BLOCK_R=rows, BLOCK_I=block_in,
        BLOCK_K=_block_k(slot_TK), num_warps=warps)
    return finish(y)


def _decode_op(name: str, call, fake):
    """A decode kernel as a torch custom op (molae::NAME), so that torch.compile keeps it whole (and CUDA graphs
    capture it) instead of tracing into Triton's launcher; eager calls skip the op's dispatch."""
    op = torch.library.custom_op(f"molae::{name}", call, mutates_args=())
    op.register_fake(fake)
    overload = getattr(torch.ops.molae, name).default  # the OpOverload itself: what Dynamo traces most plainly

    def run(*args):
        return overload(*args) if torch.compiler.is_compiling() else call(*args)
    run.__doc__ = (globals()[f"{name}_reference"].__doc__ or "") + " The Triton kernel where it runs."
    return run


group_gemv = _decode_op("group_gemv", _group_gemv_call,
                        lambda x, W, s, per: x.new_empty(x.shape[0], W.shape[0], W.shape[1]))
group_gemv_pair = _decode_op("group_gemv_pair", _group_gemv_pair_call,
                             lambda x, Wa, Wb, s, per: x.new_empty(2, x.shape[0], Wa.shape[0], Wa.shape[1]))
slot_swiglu = _decode_op("slot_swiglu", _slot_swiglu_call,
                         lambda zg, zu, Wg, Wu, s, w, pg, pu: zg.new_empty(s.numel(), Wg.shape[1]))
slot_sum = _decode_op("slot_sum", _slot_sum_call,
                      lambda h, W, s, per, G, wide=False: h.new_empty(s.shape[0], G, W.shape[1],
                                                                      dtype=_sum_dtype(h.dtype, wide)))
group_sum = _decode_op("group_sum", _group_sum_call,
                       lambda u, W, s, per: u.new_empty(u.shape[0], W.shape[1], dtype=W.dtype))
slot_group_sum = _decode_op("slot_group_sum", _slot_group_sum_call,
                            lambda h, A, B, s, per: h.new_empty(s.shape[0], B.shape[1]))


BLOCK_ROWS = 16  # output rows per decode program
BLOCK_IN = 256  # input columns per step of a decode program's dot products (an 8 KB bf16 tile per load)
SPLIT_MIN_IN = 256  # the fewest input columns one piece of a split GEMV takes
SPLIT_PROGRAMS_PER_SM = 4  # a GEMV splits its input until about this many programs per SM stream weights
GEMV_WARPS = 4  # warps per decode GEMV program (Triton's default)
# slot_swiglu's gate and up dot products in one loop (both tiles of a step in flight) rather than one after the
# other: off until scripts/gpu/decode_sweep.py has timed it (the probe at 8b7a785: _slot_swiglu, 17 us a
# Qwen3-30B-A3B layer for 19 MB, is the decode path's largest kernel, a quarter of the copy bandwidth)
SWIGLU_ONE_LOOP = False
# per decode kernel (group_gemv, slot_swiglu, slot_gemv, group_sum_slots, group_sum): (rows, block_in, warps) in
# place of the three shared constants above; none until decode_sweep.py --per-kernel has timed them
LAUNCH_OVERRIDES: dict[str, tuple[int, int, int]] = {}
DECODE_KERNELS = ("group_gemv", "slot_swiglu", "slot_gemv", "group_sum_slots", "group_sum")
# (scripts/gpu/decode_sweep.py times whole decode layers over these constants on the GPU)
BLOCK_REDUCE = 1024  # output columns per program of the per-group slot sum


BLOCK_F = 1024  # one program per row, walking F in blocks of this many columns
BLOCK_ZERO = 8192  # elements per program of _zero_idle


class _SwiGLUWeighted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_SF, up_SF, w_S):
        gate_SF, up_SF, w_S = gate_SF.contiguous(), up_SF.contiguous(), w_S.contiguous()
        S, F_ = gate_SF.shape
        assert up_SF.shape == (S, F_) and w_S.shape == (S,), (gate_SF.shape, up_SF.shape, w_S.shape)
        h_SF = torch.empty_like(gate_SF)
        if S:
            _swiglu_fwd[(S, triton.cdiv(F_, BLOCK_F))](gate_SF, up_SF, w_S, h_SF, F_, BLOCK=BLOCK_F)
        ctx.save_for_backward(gate_SF, up_SF, w_S)
        return h_SF

    @staticmethod
    def backward(ctx, dh_SF):
        gate_SF, up_SF, w_S = ctx.saved_tensors
        dh_SF = dh_SF.contiguous()
        S, F_ = gate_SF.shape
        dgate_SF, dup_SF = torch.empty_like(gate_SF), torch.empty_like(up_SF)
        dw_S = torch.empty(S, dtype=torch.float32, device=w_S.device)
        if S:
            _swiglu_bwd[(S,)](gate_SF, up_SF, w_S, dh_SF, dgate_SF, dup_SF, dw_S, F_, BLOCK=BLOCK_F)
        return dgate_SF, dup_SF, dw_S.to(w_S.dtype)


if triton is not None:

    @triton.jit
    def _swiglu_fwd(gate_ptr, up_ptr, w_ptr, h_ptr, F_, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_
        g = tl.load(gate_ptr + row * F_ + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * F_ + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row).to(tl.float32)
        h = g * tl.sigmoid(g) * u * w
        tl.store(h_ptr + row * F_ + cols, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(gate_ptr, up_ptr, w_ptr, dh_ptr, dgate_ptr, dup_ptr, dw_ptr, F_, BLOCK: tl.constexpr):
        # h = silu(g) u w:  dg = dh w u s (1 + g (1 - s)),  du = dh w silu(g),  dw = sum_f dh silu(g) u
        row = tl.program_id(0).to(tl.int64)
        w = tl.load(w_ptr + row).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, F_, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < F_
            off = row * F_ + cols
            g = tl.load(gate_ptr + off, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + off, mask=mask, other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + off, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            silu = g * s
            tl.store(dgate_ptr + off, (dh * w * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)
            tl.store(dup_ptr + off, (dh * w * silu).to(dup_ptr.dtype.element_ty), mask=mask)
            acc += dh * silu * u
        tl.store(dw_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def _tile(W_ptr, v_ptr, rows, R, n_in, cols, hi):
        """One step of a row-block dot product, loaded as float32: (W[rows, cols] [BLOCK_R, BLOCK_I] of a row-major
        [R, n_in] block at W_ptr, v[cols]), zero outside rows < R and cols < hi."""
        v = tl.load(v_ptr + cols, mask=cols < hi, other=0.0).to(tl.float32)
        mask = (rows[:, None] < R) & (cols[None, :] < hi)
        w = tl.load(W_ptr + rows[:, None] * n_in + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        return w, v

    @triton.jit
    def _rows_dot(W_ptr, v_ptr, rows, R, n_in, lo, hi, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
        """[BLOCK_R] float32: W[rows, lo:hi] @ v[lo:hi] for a row-major [R, n_in] block at W_ptr, v at v_ptr."""
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_I):
            w, v = _tile(W_ptr, v_ptr, rows, R, n_in, start + tl.arange(0, BLOCK_I), hi)
            acc += tl.sum(w * v[None, :], axis=1)
        return acc

    @triton.jit
    def _rows_dot_pair(Wa_ptr, va_ptr, na, Wb_ptr, vb_ptr, nb, rows, R, BLOCK_R: tl.constexpr,
                       BLOCK_I: tl.constexpr):
        """(_rows_dot of Wa [R, na] with va, of Wb [R, nb] with vb) in one loop: both tiles of a step loaded
        before either is reduced, so a program keeps twice the bytes in flight (two loops wait on one at a time)."""
        acc_a = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, tl.maximum(na, nb), BLOCK_I):
            cols = start + tl.arange(0, BLOCK_I)
            wa, va = _tile(Wa_ptr, va_ptr, rows, R, na, cols, na)
            wb, vb = _tile(Wb_ptr, vb_ptr, rows, R, nb, cols, nb)
            acc_a += tl.sum(wa * va[None, :], axis=1)
            acc_b += tl.sum(wb * vb[None, :], axis=1)
        return acc_a, acc_b

    @triton.jit
    def _piece(pid, split, chunk, n_in):
        """(block of rows, piece of the input columns [lo, hi)) of a program whose grid axis packs both."""
        piece = pid % split
        lo = piece * chunk
        return pid // split, piece, lo, tl.minimum(lo + chunk, n_in)

    @triton.jit
    def _in_group(slot_ptr, t, K, g, per_group, BLOCK_K: tl.constexpr):
        """[BLOCK_K] bool: which of token t's K slots are in group g, from one vector load of its slot ids (a loop
        of K scalar loads, each waiting on the last, put microseconds of latency in front of every program)."""
        ks = tl.arange(0, BLOCK_K)
        return (ks < K) & (tl.load(slot_ptr + t * K + ks, mask=ks < K, other=0) // per_group == g)

    @triton.jit
    def _uses_group(slot_ptr, t, K, g, per_group, BLOCK_K: tl.constexpr):
        return tl.max(_in_group(slot_ptr, t, K, g, per_group, BLOCK_K).to(tl.int32), axis=0)

    @triton.jit
    def _group_gemv(x_ptr, Wa_ptr, Wb_ptr, slot_ptr, z_ptr, n_in, R, per_group, K, split, chunk, kinds,
                    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
        """z[piece, kind, t, g, rows] = W_kind[g, rows, piece's columns] @ x[t, ...]; kind 0 reads Wa, 1 Wb."""
        t, g = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        T, G = tl.num_programs(0), tl.num_programs(1)
        per_kind = tl.num_programs(2) // kinds
        kind = tl.program_id(2) // per_kind
        if _uses_group(slot_ptr, t, K, g, per_group, BLOCK_K) > 0:
            block, piece, lo, hi = _piece(tl.program_id(2) % per_kind, split, chunk, n_in)
            rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
            if kind == 0:
                z = _rows_dot(Wa_ptr + g * R * n_in, x_ptr + t * n_in, rows, R, n_in, lo, hi, BLOCK_R, BLOCK_I)
            else:
                z = _rows_dot(Wb_ptr + g * R * n_in, x_ptr + t * n_in, rows, R, n_in, lo, hi, BLOCK_R, BLOCK_I)
            out = z_ptr + ((piece.to(tl.int64) * kinds + kind) * T * G + t * G + g) * R + rows
            tl.store(out, z.to(z_ptr.dtype.element_ty), mask=rows < R)

    @triton.jit
    def _slot_swiglu(zg_ptr, zu_ptr, Wg_ptr, Wu_ptr, slot_ptr, w_ptr, h_ptr, K, F_, Gg, Ig, Gu, Iu, per_g, per_u,
                     BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, ONE_LOOP: tl.constexpr):
        s = tl.program_id(0).to(tl.int64)
        t = s // K
        e = tl.load(slot_ptr + s).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        Wg, zg = Wg_ptr + e * F_ * Ig, zg_ptr + (t * Gg + e // per_g) * Ig
        Wu, zu = Wu_ptr + e * F_ * Iu, zu_ptr + (t * Gu + e // per_u) * Iu
        if ONE_LOOP:
            g, u = _rows_dot_pair(Wg, zg, Ig, Wu, zu, Iu, rows, F_, BLOCK_R, BLOCK_I)
        else:
            g = _rows_dot(Wg, zg, rows, F_, Ig, 0, Ig, BLOCK_R, BLOCK_I)
            u = _rows_dot(Wu, zu, rows, F_, Iu, 0, Iu, BLOCK_R, BLOCK_I)
        h = g * tl.sigmoid(g) * u * tl.load(w_ptr + s).to(tl.float32)
        tl.store(h_ptr + s * F_ + rows, h.to(h_ptr.dtype.element_ty), mask=rows < F_)

    @triton.jit
    def _slot_gemv(h_ptr, W_ptr, slot_ptr, y_ptr, S, R, F_, split, chunk,
                   BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
        s = tl.program_id(0).to(tl.int64)
        e = tl.load(slot_ptr + s).to(tl.int64)
        block, piece, lo, hi = _piece(tl.program_id(1), split, chunk, F_)
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        y = _rows_dot(W_ptr + e * R * F_, h_ptr + s * F_, rows, R, F_, lo, hi, BLOCK_R, BLOCK_I)
        tl.store(y_ptr + (piece.to(tl.int64) * S + s) * R + rows, y, mask=rows < R)

    @triton.jit
    def _group_reduce(y_ptr, slot_ptr, u_ptr, S, K, R, per_group, split, BLOCK: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        t, g = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        mask = _in_group(slot_ptr, t, K, g, per_group, BLOCK_K)[:, None] & (cols[None, :] < R)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for piece in range(split):  # t's slots in group g as one [BLOCK_K, BLOCK] load a piece, summed in a fixed
            # order: no atomics, the same sum every run
            tile = tl.load(y_ptr + (piece * S + t * K + ks[:, None]) * R + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(tile, axis=0)
        tl.store(u_ptr + (t * tl.num_programs(1) + g) * R + cols, acc.to(u_ptr.dtype.element_ty), mask=cols < R)

    @triton.jit
    def _add_split(parts_ptr, out_ptr, n, split, BLOCK: tl.constexpr):
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for piece in range(split):
            acc += tl.load(parts_ptr + piece * n + cols, mask=cols < n, other=0.0)
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < n)

    @triton.jit
    def _group_sum(u_ptr, W_ptr, slot_ptr, y_ptr, G, n_in, R, per_group, K, split, chunk,
                   BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        block, piece, lo, hi = _piece(tl.program_id(1), split, chunk, n_in)
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for g in range(G):
            if _uses_group(slot_ptr, t, K, g, per_group, BLOCK_K) > 0:
                u_row = u_ptr + (t * G + g) * n_in
                acc += _rows_dot(W_ptr + g * R * n_in, u_row, rows, R, n_in, lo, hi, BLOCK_R, BLOCK_I)
        out = y_ptr + (piece.to(tl.int64) * tl.num_programs(0) + t) * R + rows
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rows < R)

    @triton.jit
    def _group_sum_slots(y_ptr, W_ptr, slot_ptr, out_ptr, S, G, n_in, R, per_group, K, split_y, split, chunk,
                         BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[piece, t, rows] = sum over t's groups g of W[g, rows, piece's columns] @ u_tg, where u_tg = the sum
        of slot_gemv's float32 partials y[p, t*K+k] over t's slots k in g and the pieces p, loaded as one
        [BLOCK_K, BLOCK_I] tile a piece per step of the dot product."""
        t = tl.program_id(0).to(tl.int64)
        block, piece, lo, hi = _piece(tl.program_id(1), split, chunk, n_in)
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for g in range(G):
            member = _in_group(slot_ptr, t, K, g, per_group, BLOCK_K)
            if tl.max(member.to(tl.int32), axis=0) > 0:
                for start in range(lo, hi, BLOCK_I):
                    cols = start + tl.arange(0, BLOCK_I)
                    u = tl.zeros([BLOCK_I], dtype=tl.float32)
                    for p in range(split_y):  # a fixed order: the same sum every run
                        u += tl.sum(tl.load(y_ptr + (p * S + t * K + ks[:, None]) * n_in + cols[None, :],
                                            mask=member[:, None] & (cols[None, :] < hi), other=0.0), axis=0)
                    mask = (rows[:, None] < R) & (cols[None, :] < hi)
                    w = tl.load(W_ptr + g * R * n_in + rows[:, None] * n_in + cols[None, :], mask=mask,
                                other=0.0).to(tl.float32)
                    acc += tl.sum(w * u[None, :], axis=1)
        out = out_ptr + (piece.to(tl.int64) * tl.num_programs(0) + t) * R + rows
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows < R)

    @triton.jit
    def _zero_idle(w_ptr, rows_ptr, n, BLOCK: tl.constexpr):
        e = tl.program_id(0)
        if tl.load(rows_ptr + e) == 0:  # programs of experts that got rows return at once
            cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            tl.store(w_ptr + e.to(tl.int64) * n + cols, tl.zeros([BLOCK], dtype=w_ptr.dtype.element_ty), mask=cols < n)


__all__ = ["triton_ok", "swiglu_weighted", "swiglu_weighted_reference", "zero_idle_experts", "zero_idle_experts_reference",
           "group_gemv", "group_gemv_reference", "group_gemv_pair", "group_gemv_pair_reference", "slot_swiglu",
           "slot_swiglu_reference", "slot_sum", "slot_sum_reference", "group_sum", "group_sum_reference",
           "slot_group_sum", "slot_group_sum_reference"]
