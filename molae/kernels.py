"""Fused elementwise kernels of the expert path (Triton on CUDA; the reference everywhere else).
Each fast function has a `_reference` twin with the same signature and result.

Shape legend: S routed (token, expert) slots sorted by expert; F expert intermediate size.

swiglu_weighted(gate_SF, up_SF, w_S) = silu(gate) * up * w[:, None], computed in float32 (or
wider) and returned in gate's dtype. Folding the routing weight into the SwiGLU means the routed outputs
can be summed per token (in latent space for MoLAE) with no weighting pass of their own; done
unfused in PyTorch the three products are three passes over [S, F], the kernel is one (two
reads, one write), and its backward is one pass that also reduces the weight's gradient per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def swiglu_weighted_reference(gate_SF: torch.Tensor, up_SF: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """Slow and obvious: silu(gate) * up * w per row, in float32 (or wider), cast back to gate's dtype."""
    dt = torch.promote_types(gate_SF.dtype, torch.float32)
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
    return triton is not None and x.is_cuda


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
    def _zero_idle(w_ptr, rows_ptr, n, BLOCK: tl.constexpr):
        e = tl.program_id(0)
        if tl.load(rows_ptr + e) == 0:  # programs of experts that got rows return at once
            cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            tl.store(w_ptr + e.to(tl.int64) * n + cols, tl.zeros([BLOCK], dtype=w_ptr.dtype.element_ty), mask=cols < n)


__all__ = ["triton_ok", "swiglu_weighted", "swiglu_weighted_reference", "zero_idle_experts", "zero_idle_experts_reference"]
