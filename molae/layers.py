"""MoE and MoLAE feed-forward layers (MOLAE.md §1-2).

Shape legend (suffixes on tensor names, torchtitan style):
  T tokens          K experts per token (top-k)     S = T*K routed (token, expert) slots
  D hidden size n   F expert intermediate size m    L latent size d
  E routed experts  G expert groups                 H shared-expert intermediate size

An expert is a SwiGLU FFN: E_i(x) = W_down_i (silu(W_gate_i x) * (W_up_i x)).
`Experts` stores all routed experts stacked as [E, ...] tensors. Each projection kind
(gate, up, down) is either whole per expert or factorized through a shared latent per
group of experts:

  whole     gate_proj, up_proj [E, F, D]     down_proj [E, D, F]
  latent    gate_B, up_B       [G, L, D]     gate_A, up_A [E, F, L]    W_i = A_i @ B_g
            down_B             [G, D, L]     down_A       [E, L, F]    W_i = B_g @ A_i

Group g holds expert slots [g*E/G, (g+1)*E/G); expert e sits in slot e unless the module is
`permuted` (groups chosen by similarity): then a buffer expert_slot [E] maps the router's expert
ids to slots, tensors are stored in slot order. With no kind factorized, `Experts` is the
standard MoE experts module. Its call signature, (hidden_states [T, D], top_k_index
[T, K], top_k_weights [T, K]) -> [T, D], is that of transformers' MoE `experts`
submodules, so a MoLAE `Experts` can replace one inside any Hugging Face MoE block.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import (group_gemv, group_gemv_pair, group_sum, slot_group_sum, slot_sum, slot_swiglu,
                      swiglu_weighted, triton_ok, zero_idle_experts)
from .presets import REAL_MODELS, moe_layer

KINDS = ("gate", "up", "down")  # projection kinds of a SwiGLU expert
IMPLS = ("fast", "grouped", "decode", "reference")  # Experts' forward paths (see Experts)


# ----------------------------------------------------------------------------- configs


@dataclass
class MoEConfig:
    dim: int  # D: hidden size n
    inter: int  # F: expert intermediate size m
    n_experts: int  # E: routed experts
    top_k: int  # K: experts per token
    router: str = "softmax"  # "softmax", or "sigmoid" (DeepSeek-V3: bias only for choosing)
    norm_topk_prob: bool = False  # renormalise the chosen experts' weights to sum to 1
    routed_scale: float = 1.0  # DeepSeek-V3's routed_scaling_factor
    shared_inter: int = 0  # H: intermediate size of the always-on shared expert (0: none)
    shared_gate: bool = False  # Qwen2-MoE: scale the shared expert by sigmoid(x . w)
    n_group: int = 1  # DeepSeek-V3's group-limited routing: experts in n_group contiguous routing groups, ...
    topk_group: int = 1  # ... each token routed within its topk_group best groups (n_group = 1: no limit)

    def __post_init__(self):
        for name in ("dim", "inter", "n_experts", "top_k", "n_group", "topk_group"):
            _check_positive_int(name, getattr(self, name))
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} is out of range: allowed 1 <= top_k <= n_experts={self.n_experts}")
        if self.n_group > 1:
            if self.n_experts % self.n_group or self.topk_group > self.n_group:
                raise ValueError(f"n_group={self.n_group}, topk_group={self.topk_group}: n_group must divide "
                                 f"n_experts={self.n_experts} and topk_group be at most n_group")
            if self.top_k > self.topk_group * (self.n_experts // self.n_group):
                raise ValueError(f"top_k={self.top_k} exceeds the experts of topk_group={self.topk_group} groups "
                                 f"({self.topk_group * (self.n_experts // self.n_group)}): raise topk_group")
        if self.router not in ("softmax", "sigmoid"):
            raise ValueError(f"router={self.router!r} is not known: allowed 'softmax' or 'sigmoid'")
        if self.shared_inter < 0:
            raise ValueError(f"shared_inter={self.shared_inter} is out of range: allowed >= 0 (0: no shared expert)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MoLAEConfig(MoEConfig):
    groups: int = 1  # G: experts in a group share one latent projection per kind
    latent_dim: int | dict[str, int] | None = None  # L per factorized kind; None: min(F, D) (paper: F)
    projections: tuple[str, ...] = ("up", "gate")  # factorized kinds, any subset of KINDS

    def __post_init__(self):
        super().__post_init__()
        check_groups(self.groups, self.n_experts)
        self.projections = check_projections(self.projections)
        for kind, d in self.latent_dims().items():
            check_latent_dim(d, self.n_experts // self.groups * self.inter, self.dim, name=f"latent_dim[{kind}]")

    def latent_dims(self) -> dict[str, int]:
        """L for each factorized kind, in KINDS order."""
        return resolve_latent_dims(self.latent_dim, self.projections, self.inter, self.dim)

    @classmethod
    def from_moe(cls, cfg: MoEConfig, **latent) -> "MoLAEConfig":
        return cls(**{**asdict(cfg), **latent})


def resolve_latent_dims(latent_dim, projections, inter: int, dim: int) -> dict[str, int]:
    """{kind: L} for the factorized kinds, in KINDS order, from an int, a dict or None.
    None means the paper's d = m, capped at n: where m > n (Mixtral) n keeps every direction."""
    projections = check_projections(projections)
    if latent_dim is None:
        latent_dim = min(inter, dim)
    if isinstance(latent_dim, dict):
        missing = [k for k in projections if k not in latent_dim]
        if missing:
            raise ValueError(f"latent_dim={latent_dim} has no entry for {missing}: give an int or one per projection")
        return {k: latent_dim[k] for k in projections}
    return {k: latent_dim for k in projections}


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} is out of range: allowed a positive integer")


def check_groups(groups, n_experts):
    if not isinstance(groups, int) or groups <= 0 or n_experts % groups:
        divisors = [g for g in range(1, n_experts + 1) if n_experts % g == 0]
        raise ValueError(f"groups={groups!r} does not divide n_experts={n_experts}: allowed {divisors}")


def check_projections(projections) -> tuple[str, ...]:
    if isinstance(projections, str):
        projections = [p for p in projections.split(",") if p]
    bad = [p for p in projections if p not in KINDS]
    if bad or len(set(projections)) != len(projections):
        raise ValueError(f"projections={list(projections)} is not valid: allowed distinct names from {list(KINDS)}")
    return tuple(k for k in KINDS if k in projections)


def check_latent_dim(d, rows, cols, name="latent_dim"):
    hi = min(rows, cols)
    if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= hi:
        raise ValueError(
            f"{name}={d!r} is out of range: allowed 1 <= {name} <= min(experts_per_group*m, n) = "
            f"min({rows}, {cols}) = {hi}"
        )


# Named layer shapes of real models (MOLAE.md §1), from the one table of their configs (molae/presets.py).
PRESETS: dict[str, MoEConfig] = {name: MoEConfig(**moe_layer(name)) for name in REAL_MODELS}


# ----------------------------------------------------------------------------- parameter accounting


def param_counts(cfg: MoEConfig) -> dict[str, int]:
    """Exact parameter counts of `MoE(cfg)` / `MoLAE(cfg)`, from the config alone.

    expert_specific: per-expert matrices (A's and whole W's); shared_proj: the groups'
    latent projections (B's); routed = expert_specific + shared_proj, what replaces the
    standard experts; router; shared_expert; total.
    """
    D, F_, E = cfg.dim, cfg.inter, cfg.n_experts
    latent = cfg.latent_dims() if isinstance(cfg, MoLAEConfig) else {}
    G = cfg.groups if isinstance(cfg, MoLAEConfig) else 1
    expert_specific = sum(E * F_ * latent[k] if k in latent else E * F_ * D for k in KINDS)
    shared_proj = sum(G * L * D for L in latent.values())
    router = E * D
    shared_expert = 3 * D * cfg.shared_inter + (D if cfg.shared_inter and cfg.shared_gate else 0)
    routed = expert_specific + shared_proj
    return dict(
        total=routed + router + shared_expert,
        routed=routed,
        expert_specific=expert_specific,
        shared_proj=shared_proj,
        router=router,
        shared_expert=shared_expert,
    )


# ----------------------------------------------------------------------------- grouped matmul


def _grouped_mm_supported(x_SI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether torch's grouped_mm kernel takes these operands (device, dtype, 16-byte strides)."""
    if not hasattr(F, "grouped_mm") or x_SI.dtype != w_EOI.dtype:
        return False
    if x_SI.device.type == "cuda":
        ok_dtype = x_SI.dtype == torch.bfloat16 and _sm80_or_newer(x_SI.device.index)
    elif x_SI.device.type == "cpu":
        ok_dtype = x_SI.dtype in (torch.float32, torch.bfloat16)
    else:
        ok_dtype = False
    align = 16 // x_SI.element_size()
    return (
        ok_dtype
        and w_EOI.shape[1] % align == 0
        and w_EOI.shape[2] % align == 0
        and _aligned(x_SI)
        and _aligned(w_EOI)
    )


@torch.compiler.assume_constant_result  # a constant while compiling too (not a graph break at every layer)
def _sm80_or_newer(index: int) -> bool:
    # a bool, not the capability tuple: comparing an assumed-constant tuple fails inside dynamo (torch 2.11)
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _aligned(t: torch.Tensor) -> bool:
    """t's first element 16-byte aligned. Under torch.compile a tensor has no address (reading data_ptr, or
    storage_offset, broke every compiled layer's graph at its experts): there it is taken as aligned, as the
    buffers Inductor allocates are and parameters from torch's allocators; a misaligned one fails in grouped_mm
    with torch's own error, not silently."""
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0


def grouped_linear(x_SI, w_EOI, offs_E, backend: str | None = None):
    """y[s] = w[e] @ x[s] for the rows s of group e, rows sorted by group.

    x_SI [S, I]; w_EOI [E, O, I]; offs_E [E] int32 cumulative row counts (end of each group's
    rows). Rows past offs_E[-1] are padding: their outputs are left unwritten and they add nothing
    to the weight gradient. backend: "grouped_mm" (torch's kernel, no host sync) or "bmm" (a padded
    batched matmul, the reference); None: grouped_mm where it takes these operands.
    """
    backend = backend or pick_backend(x_SI, w_EOI)
    if backend == "bmm":
        return _padded_bmm(x_SI, w_EOI, offs_E)
    if backend != "grouped_mm":
        raise ValueError(f"backend={backend!r} is not known: allowed 'grouped_mm', 'bmm' or None")
    return _GroupedLinear.apply(x_SI, w_EOI, offs_E)


def pick_backend(x_SI, w_EOI) -> str:
    if _grouped_mm_supported(x_SI, w_EOI):
        return "grouped_mm"
    if x_SI.is_cuda:  # once per shape: the warnings registry keeps one per message and caller
        warnings.warn(f"experts of shape {list(w_EOI.shape[1:])} (dtype {x_SI.dtype}) run the padded batched-matmul "
                      "fallback, which syncs with the host: grouped_mm takes bfloat16 with both sizes multiples of 8 "
                      "(convert with latent sizes that are: molae convert --budget allocates them so)", stacklevel=2)
    return "bmm"


class _GroupedLinear(torch.autograd.Function):
    """grouped_mm with its backward written out, so that experts that received no rows get an
    explicit zero weight gradient. The CUDA grouped weight-gradient kernel may leave such groups
    uninitialised (allocator garbage, NaN included), which a MoE whose routing leaves experts idle
    (sigmoid routers early in training) turns into NaN parameters via the global clip norm."""

    @staticmethod
    def forward(ctx, x_SI, w_EOI, offs_E):
        ctx.save_for_backward(x_SI, w_EOI, offs_E)
        return F.grouped_mm(x_SI, w_EOI.transpose(-2, -1), offs=offs_E)

    @staticmethod
    def backward(ctx, g_SO):
        x_SI, w_EOI, offs_E = ctx.saved_tensors
        g_SO = g_SO.contiguous()
        dx_SI = F.grouped_mm(g_SO, w_EOI, offs=offs_E) if ctx.needs_input_grad[0] else None
        dw_EOI = None
        if ctx.needs_input_grad[1]:
            dw_EOI = F.grouped_mm(g_SO.t(), x_SI, offs=offs_E)  # groups along the reduction (row) dim
            dw_EOI = zero_idle_experts(dw_EOI, torch.diff(offs_E, prepend=offs_E.new_zeros(1)))
        return dx_SI, dw_EOI, None


def _padded_bmm(x_SI, w_EOI, offs_E):
    """Batched fallback: scatter rows into [E, C, I] (C = most rows of one group), one bmm.
    Padding rows (past offs_E[-1]) come out as zeros."""
    E, O, I = w_EOI.shape
    S = x_SI.shape[0]
    rows_S = torch.arange(S, device=x_SI.device)
    expert_S = torch.searchsorted(offs_E, rows_S.to(offs_E.dtype), right=True)  # E for padding rows
    keep = expert_S < E
    expert_S, rows_S = expert_S[keep], rows_S[keep]
    counts_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1))
    C = int(counts_E.max()) if len(rows_S) else 0  # host syncs: this path is the fallback
    pos_S = rows_S - (offs_E - counts_E).long()[expert_S]
    x_ECI = x_SI.new_zeros(E, C, I).index_put((expert_S, pos_S), x_SI[rows_S])
    y_ECO = torch.bmm(x_ECI, w_EOI.transpose(1, 2))
    return x_SI.new_zeros(S, O).index_put((rows_S,), y_ECO[expert_S, pos_S])


# ----------------------------------------------------------------------------- routing


class _Adjoint(torch.autograd.Function):
    """A linear map of rows whose backward is its adjoint map, both given as functions: the row
    gathers and per-token sums below are each other's adjoints, so both directions stay gathers and
    reshaped sums (no atomics, deterministic) instead of autograd's index_add."""

    @staticmethod
    def forward(ctx, x, op, adjoint):
        ctx.adjoint = adjoint
        return op(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.adjoint(g.contiguous()), None, None


class Routing:
    """Where each routed (token, expert) slot goes, computed once per call with no host sync.

    Three row spaces: tokens T; slots S = T*K sorted by expert (the grouped GEMMs' rows); with
    G > 1 groups also pairs P, one row per (token, group) the token touches, sorted by group (the
    shared projections' rows: each group's B applied only to its own tokens). P is allocated at
    its bound T*min(G, K); rows past offs_G[-1] are padding no GEMM touches. The maps move rows
    between the spaces, summing where several slots land in one token or pair; each is the adjoint
    of its reverse, which is its backward.
    """

    def __init__(self, idx_TK: torch.Tensor, n_experts: int, groups: int):
        with torch.no_grad():
            T, K = idx_TK.shape
            E, G, dev = n_experts, groups, idx_TK.device
            self.T, self.K, self.G = T, K, G
            idx_S = idx_TK.reshape(-1)
            self.expert_S, self.order_S = torch.sort(idx_S, stable=True)  # slot order_S[j] is j-th in expert order
            self.inv_S = torch.empty_like(self.order_S)
            self.inv_S[self.order_S] = torch.arange(T * K, device=dev)
            self.tok_S = self.order_S // K
            self.offs_E = torch.searchsorted(self.expert_S, torch.arange(E, device=dev), right=True).to(torch.int32)
            if G == 1:
                return
            grp_TK = idx_TK // (E // G)
            self.onehot_TGK = F.one_hot(grp_TK, G).transpose(1, 2)  # [T, G, K]: slot k of t is in group g
            present_TG = self.onehot_TGK.any(-1)
            count_G = present_TG.sum(0)
            rank_TG = present_TG.cumsum(0) - present_TG.long()  # t's place among group g's tokens
            pos_TG = (count_G.cumsum(0) - count_G) + rank_TG  # its pair row, where present
            P = T * min(G, K)
            dest = torch.where(present_TG, pos_TG, P).reshape(-1)  # absent pairs -> a discarded row
            tg = torch.arange(T * G, device=dev)
            self.tg_P = torch.full((P + 1,), T * G, device=dev).scatter_(0, dest, tg)[:P]  # t*G+g; padding T*G
            self.tok_P = torch.clamp(self.tg_P // G, max=T - 1)
            self.offs_G = count_G.cumsum(0).to(torch.int32)
            self.pair_S = pos_TG.gather(1, grp_TK).reshape(-1)[self.order_S]

    # -- slots <-> tokens (slot rows of a token summed: the top-k combine)
    def slots_from_tokens(self, x_TI):
        return _Adjoint.apply(x_TI, self._gather_tokens, self._sum_to_tokens)

    def tokens_from_slots(self, u_SI):
        return _Adjoint.apply(u_SI, self._sum_to_tokens, self._gather_tokens)

    def _gather_tokens(self, x_TI):
        return x_TI[self.tok_S]

    def _sum_to_tokens(self, u_SI):
        return u_SI[self.inv_S].view(self.T, self.K, -1).sum(1)

    # -- slots <-> pairs (G > 1: slots of a token within one group summed)
    def slots_from_pairs(self, z_PI):
        return _Adjoint.apply(z_PI, self._gather_pairs, self._sum_to_pairs)

    def pairs_from_slots(self, u_SI):
        return _Adjoint.apply(u_SI, self._sum_to_pairs, self._gather_pairs)

    def _gather_pairs(self, z_PI):
        return z_PI[self.pair_S]

    def _sum_to_pairs(self, u_SI):  # padding pair rows get some real row's sum; nothing reads them
        u_TGI = torch.bmm(self.onehot_TGK.to(u_SI.dtype), u_SI[self.inv_S].view(self.T, self.K, -1))
        return u_TGI.view(self.T * self.G, -1)[self.tg_P.clamp(max=self.T * self.G - 1)]

    # -- pairs <-> tokens (G > 1: a token's pair rows summed)
    def pairs_from_tokens(self, x_TI):
        return _Adjoint.apply(x_TI, self._gather_pair_tokens, self._sum_pairs_to_tokens)

    def tokens_from_pairs(self, y_PI):
        return _Adjoint.apply(y_PI, self._sum_pairs_to_tokens, self._gather_pair_tokens)

    def _gather_pair_tokens(self, x_TI):
        return x_TI[self.tok_P]

    def _sum_pairs_to_tokens(self, y_PI):  # padding rows go to a discarded row T*G
        T, G = self.T, self.G
        y_XI = y_PI.new_zeros(T * G + 1, y_PI.shape[1]).index_copy_(0, self.tg_P, y_PI)
        return y_XI[: T * G].view(T, G, -1).sum(1)


# ----------------------------------------------------------------------------- experts


def param_shapes(dim: int, inter: int, n_experts: int, latent: dict[str, int], groups: int) -> dict[str, tuple]:
    """{name: shape} of an experts module's tensors, per kind: a whole `{kind}_proj` [E, F, D] ([E, D, F] for
    down), or W_i = A_i B_g (gate, up: A [E, F, L], B [G, L, D]) and W_i = B_g A_i (down: B [G, D, L], A [E, L, F]).
    E is the number of experts whose tensors are held (an EP rank holds its own); the B's are per group."""
    D, F_, E, G = dim, inter, n_experts, groups
    shapes = {}
    for kind in KINDS:
        L = latent.get(kind)
        if L is None:
            shapes[f"{kind}_proj"] = (E, D, F_) if kind == "down" else (E, F_, D)
        elif kind == "down":
            shapes.update(down_B=(G, D, L), down_A=(E, L, F_))
        else:
            shapes.update({f"{kind}_B": (G, L, D), f"{kind}_A": (E, F_, L)})
    return shapes


class Experts(nn.Module):
    """Routed SwiGLU experts, stacked; kinds in `latent` factorized through per-group latents.

    forward(hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D].
    `impl` picks the path: "grouped" (sorted tokens, grouped GEMMs, latent combine), "decode" (per-slot
    GEMVs straight from the stacked weights: few launches, for few tokens), "fast" (decode where the Triton
    kernels run, no gradient is needed and decode_fits(T, K, E, ...), else grouped) or "reference" (a plain
    loop over experts with each expert's weights multiplied out).
    """

    shared_params: tuple[str, ...] = ()  # parameters that are not per-expert (LatentMoE's projections)

    def __init__(self, dim: int, inter: int, n_experts: int, latent: dict[str, int] | None = None, groups: int = 1,
                 permuted: bool = False):
        super().__init__()
        latent = dict(latent or {})
        check_groups(groups, n_experts)
        check_projections(list(latent))
        for kind, d in latent.items():
            check_latent_dim(d, n_experts // groups * inter, dim, name=f"latent_dim[{kind}]")
        self.dim, self.inter, self.n_experts, self.groups = dim, inter, n_experts, groups
        self.latent = {k: latent[k] for k in KINDS if k in latent}
        self.impl = "fast"
        for name, shape in param_shapes(dim, inter, n_experts, self.latent, groups).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        if permuted:  # router's expert id -> slot of its tensors (and so its group)
            self.register_buffer("expert_slot", torch.arange(n_experts))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None):
        """Normal init. std=None: each tensor fan-in scaled (std = in_features**-0.5), so a factorized
        W = A B has the same output scale as a whole one. std=s (training from scratch, like HF's
        initializer_range): whole matrices N(0, s^2); a factorized kind's first-applied factor
        N(0, 1/in) and its second N(0, s^2 in / L), so the product's entries have variance s^2."""
        for name, p in self.named_parameters():
            kind, _, part = name.partition("_")
            if kind not in KINDS:
                continue
            if std is None:
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)
            elif part == "proj":
                nn.init.normal_(p, std=std)
            else:
                first = "B" if kind != "down" else "A"  # gate/up: x -> B_g x -> A_i (.); down: h -> A_i h -> B_g (.)
                fan_in = self.dim if kind != "down" else self.inter
                L = self.latent[kind]
                nn.init.normal_(p, std=fan_in**-0.5 if part == first else std * (fan_in / L) ** 0.5)

    def extra_repr(self):
        return f"dim={self.dim}, inter={self.inter}, n_experts={self.n_experts}, groups={self.groups}, latent={self.latent}"

    def slot(self, expert):
        """Where expert (a router id, int or tensor) keeps its tensors."""
        return self.expert_slot[expert] if hasattr(self, "expert_slot") else expert

    def expert_weight(self, kind: str, e: int) -> torch.Tensor:
        """Expert e's whole [F, D] (gate, up) or [D, F] (down) matrix, multiplied out if factorized."""
        s = int(self.slot(e))
        if kind not in self.latent:
            return getattr(self, f"{kind}_proj")[s]
        A, B = getattr(self, f"{kind}_A")[s], getattr(self, f"{kind}_B")[s // (self.n_experts // self.groups)]
        return B @ A if kind == "down" else A @ B

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """All experts' whole matrices in router order, {kind: [E, F, D] or [E, D, F]}; for export and checks."""
        return multiply_out(dict(self.named_parameters()) | dict(self.named_buffers()))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if self.impl == "reference":
            return self.forward_reference(hidden_states, top_k_index, top_k_weights)
        if self.impl == "decode" or (self.impl == "fast" and self._decode_fits(hidden_states, top_k_index)):
            return self.forward_decode(hidden_states, top_k_index, top_k_weights)
        return self.forward_fast(hidden_states, top_k_index, top_k_weights)

    def _decode_fits(self, x_TD, idx_TK) -> bool:
        """Few slots, the Triton kernels run here (inside torch.compile too: they are custom ops), and no
        gradient is asked for (they have no backward)."""
        return (decode_fits(*idx_TK.shape, self.n_experts, bool(self.latent), self.groups) and triton_ok(x_TD)
                and not self._needs_grad(x_TD))

    def _needs_grad(self, x_TD) -> bool:
        return torch.is_grad_enabled() and (x_TD.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward_reference(self, x_TD, idx_TK, w_TK):
        """Slow and obvious: for each expert, its tokens through its own multiplied-out SwiGLU."""
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.n_experts):
            tok, slot = torch.where(idx_TK == e)
            if tok.numel() == 0:
                continue
            x = x_TD[tok]
            h = F.silu(x @ self.expert_weight("gate", e).T) * (x @ self.expert_weight("up", e).T)
            y = (h @ self.expert_weight("down", e).T) * w_TK[tok, slot, None].to(x.dtype)
            y_TD = y_TD.index_add(0, tok, y)
        return y_TD

    def forward_fast(self, x_TD, idx_TK, w_TK, backend: str | None = None):
        """Shared projections once per token and group, per-expert GEMMs over slots sorted by expert,
        SwiGLU and routing weight in one pass, routed outputs summed in latent space before one
        B_down GEMM per group. No host sync anywhere (grouped_mm path), so it can be graph-captured."""
        x_TD, param = _autocast(x_TD, self)
        r = Routing(self.slot(idx_TK), self.n_experts, self.groups)  # from here on, experts are slots
        gl = lambda x, w: grouped_linear(x, w, r.offs_E, backend)  # noqa: E731
        factorized_in = [k for k in ("gate", "up") if k in self.latent]  # (set ops on dict keys: a graph break in 2.11)
        x_S = r.slots_from_tokens(x_TD) if len(factorized_in) < 2 else None  # a kind kept whole reads x
        x_P = r.pairs_from_tokens(x_TD) if self.groups > 1 and factorized_in else None

        def expert_input(kind):  # [S, L] latent B_g x, or [S, D] hidden state, per sorted slot
            if kind not in self.latent:
                return x_S
            B_GLD = param(f"{kind}_B")
            if self.groups == 1:  # one dense GEMM over all tokens
                return r.slots_from_tokens(x_TD @ B_GLD[0].T)
            return r.slots_from_pairs(grouped_linear(x_P, B_GLD, r.offs_G, backend))  # each group's tokens

        gate_SF = gl(expert_input("gate"), param("gate_A" if "gate" in self.latent else "gate_proj"))
        up_SF = gl(expert_input("up"), param("up_A" if "up" in self.latent else "up_proj"))
        w_S = w_TK.reshape(-1)[r.order_S]
        h_SF = swiglu_weighted(gate_SF, up_SF, w_S)  # routing weight folded in: the combine is a plain sum

        if "down" not in self.latent:
            return r.tokens_from_slots(gl(h_SF, param("down_proj")))  # [T, D]
        u_SL = gl(h_SF, param("down_A"))
        B_GDL = param("down_B")
        if self.groups == 1:
            return r.tokens_from_slots(u_SL) @ B_GDL[0].T  # u = sum_k w_k A_k h_k, then y = B_down u
        u_PL = r.pairs_from_slots(u_SL)
        return r.tokens_from_pairs(grouped_linear(u_PL, B_GDL, r.offs_G, backend))  # sum_g B_g u_g

    def forward_decode(self, x_TD, idx_TK, w_TK):
        """For few tokens (decode, small batches): each slot's expert GEMVs read its weights where they are
        stored (molae.kernels' decode kernels; their references off CUDA), the shared projections run only
        for the groups a token uses, routed outputs sum in latent space per group: four launches where gate and
        up share a latent size and down is factorized (five above FUSED_SUM_TOKENS tokens; one more per GEMV that
        splits), no sort, no host sync (CUDA-graph capturable).
        Inference only: no autograd."""
        if self._needs_grad(x_TD):
            raise ValueError("impl='decode' has no backward: run it under torch.no_grad(), or use impl='fast'")
        x_TD, param = _autocast(x_TD, self)
        E, G = self.n_experts, self.groups
        per = E // G
        s_TK = self.slot(idx_TK)

        def expert_input(kind):  # ([T, G, L] latent B_g x per group, experts per group) or ([T, 1, D] x, E)
            if kind in self.latent:
                return group_gemv(x_TD, param(f"{kind}_B"), s_TK, per), per
            return x_TD[:, None, :], E

        if "gate" in self.latent and self.latent.get("up") == self.latent["gate"]:  # one launch for both (no set
            # ops on dict keys: Dynamo 2.11 cannot compare a set with them, a graph break per layer)
            z_gate, z_up = group_gemv_pair(x_TD, param("gate_B"), param("up_B"), s_TK, per)
            per_gate = per_up = per
        else:
            (z_gate, per_gate), (z_up, per_up) = expert_input("gate"), expert_input("up")
        W = {k: param(f"{k}_A" if k in self.latent else f"{k}_proj") for k in KINDS}
        h_SF = slot_swiglu(z_gate, z_up, W["gate"], W["up"], s_TK, w_TK, per_gate, per_up)  # [T*K, F]
        if "down" not in self.latent:
            return slot_sum(h_SF, W["down"], s_TK, E, 1)[:, 0]  # [T, D]
        # y_t = sum_g B_g u_tg, u_tg = sum_k w_k A_k h_k over t's slots in g, u in float32: fused (u not stored)
        # up to FUSED_SUM_TOKENS tokens, else u [T, G, L] stored once and then multiplied (FUSED_SUM_TOKENS)
        if x_TD.shape[0] <= FUSED_SUM_TOKENS:
            return slot_group_sum(h_SF, W["down"], param("down_B"), s_TK, per)
        return group_sum(slot_sum(h_SF, W["down"], s_TK, per, G, True), param("down_B"), s_TK, per)


# The decode path's down projection sums each token's slots per group and multiplies by B_g in one kernel
# (slot_group_sum) up to this many tokens, in two (slot_sum, group_sum) beyond: every program of the fused kernel
# rebuilds its columns of u from K float32 partial rows, as many bytes again as its tile of B. Measured (H200,
# 8b7a785 against 2c7154e, results/speed/decode-compare-8b7a785.md, the fused kernel on at every decode size):
# 0.99-1.21x at 1-2 tokens at Qwen3-30B-A3B and DeepSeek-V3 shapes, but 0.91-0.96x at 4-16 tokens at
# DeepSeek-V3's (D = 7168, d = 2048); with this rule (515223d, decode-compare-515223d.md) 0.97-1.21x everywhere.
FUSED_SUM_TOKENS = 2


def decode_fits(tokens: int, top_k: int, n_experts: int, latent: bool, groups: int = 1) -> bool:
    """Whether `fast` sends T tokens of top-k to the decode kernels: up to as many routed slots as experts, and for
    latent experts up to 16 tokens (G = 1) or 8 (G > 1). The decode kernels read an expert's matrices once per slot
    it serves, the grouped path once per expert, so they win while each expert serves about one slot; a latent
    layer's decode kernels also run the shared projections once per token (GEMVs), which the grouped path runs as
    one GEMM, so they stop paying earlier, and earlier with more groups. Measured (H200, commit 1f6f682,
    results/speed.md, each layer against itself forced onto the other path; results/notes/speed.md has the table):
    standard layers win up to about E slots; MoLAE G = 1 ties at 16 tokens at DeepSeek-V3 (1.01x) and
    Qwen1.5-MoE (1.05x) and loses from 32 (1.13-1.22x), G = 8 ties at 8 tokens at DeepSeek-V3 (0.98x) and
    loses from 16 (1.28x); Mixtral's 8 experts stop both at E slots."""
    if tokens * top_k > n_experts:
        return False
    return not latent or tokens <= (16 if groups == 1 else 8)


def _autocast(x: torch.Tensor, module: nn.Module):
    """(x, param getter) in autocast's dtype when autocast is on for x's device, else as they are.
    grouped_mm is not an autocast op: without this, fp32 master weights would miss the bf16 kernel."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, lambda name: getattr(module, name)
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), lambda name: getattr(module, name).to(dt)


class LatentMoEExperts(Experts):
    """LatentMoE's routed path (NVIDIA, arXiv 2601.18089; MOLAE.md §5), same call signature as `Experts`.

    Each token is projected once D -> Lm by a shared `proj_in` [Lm, D] (the router still reads
    the full hidden state), the routed experts are standard SwiGLU experts on width Lm (this
    module's own gate/up/down_proj, [E, F, Lm] and [E, Lm, F]), and the routing-weighted sum is
    projected back Lm -> D by a shared `proj_out` [D, Lm]. Both projections are linear, so
    sum_k w_k out(E_k(in x)) = out(sum_k w_k E_k(in x)).
    """

    shared_params = ("proj_in", "proj_out")

    def __init__(self, dim: int, inter: int, n_experts: int, latent_moe_dim: int):
        check_latent_dim(latent_moe_dim, dim, dim, name="latent_moe_dim")
        super().__init__(latent_moe_dim, inter, n_experts)
        self.model_dim = dim
        self.proj_in = nn.Parameter(torch.empty(latent_moe_dim, dim))
        self.proj_out = nn.Parameter(torch.empty(dim, latent_moe_dim))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None):
        super().reset_parameters(std)
        if hasattr(self, "proj_in"):
            nn.init.normal_(self.proj_in, std=std or self.model_dim**-0.5)
            nn.init.normal_(self.proj_out, std=std or self.dim**-0.5)

    def extra_repr(self):
        return f"model_dim={self.model_dim}, " + super().extra_repr()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        z_TL = hidden_states @ self.proj_in.to(hidden_states.dtype).T
        y_TL = super().forward(z_TL, top_k_index, top_k_weights)
        return y_TL @ self.proj_out.to(y_TL.dtype).T


def multiply_out(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole expert matrices {gate, up: [E, F, D], down: [E, D, F]} from `Experts` tensors by name
    ({kind}_proj as they are; W_i = A_i @ B_g or, for down, B_g @ A_i), in router order when the
    tensors include an expert_slot map."""
    out = {}
    for kind in KINDS:
        if f"{kind}_proj" in params:
            out[kind] = params[f"{kind}_proj"]
            continue
        A, B = params[f"{kind}_A"], params[f"{kind}_B"]
        B_E = B.repeat_interleave(A.shape[0] // B.shape[0], dim=0)  # [E, ...]: each expert's group projection
        out[kind] = torch.bmm(B_E, A) if kind == "down" else torch.bmm(A, B_E)
    if "expert_slot" in params:
        out = {k: v[params["expert_slot"].to(v.device)] for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------- router, shared expert, layers


class Router(nn.Module):
    """Top-k router. softmax: weights are the chosen softmax probabilities. sigmoid (DeepSeek-V3):
    experts are chosen by sigmoid score + bias (a buffer, tuned outside autograd for load balance);
    weights are the chosen scores, unbiased. Either way optionally renormalised, then scaled."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim))
        nn.init.normal_(self.weight, std=cfg.dim**-0.5)
        if cfg.router == "sigmoid":
            self.register_buffer("bias", torch.zeros(cfg.n_experts))

    def forward(self, x_TD):
        """Returns weights [T, K] (float32), indices [T, K], auxiliary load-balancing loss (scalar)."""
        cfg = self.cfg
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        if cfg.router == "softmax":
            probs_TE = logits_TE.softmax(-1)
            idx_TK = group_limited(probs_TE, cfg.n_group, cfg.topk_group, "max").topk(cfg.top_k, dim=-1).indices
            w_TK = probs_TE.gather(1, idx_TK)
        else:
            scores_TE = logits_TE.sigmoid()
            idx_TK = group_limited(scores_TE + self.bias, cfg.n_group, cfg.topk_group).topk(cfg.top_k, dim=-1).indices
            w_TK = scores_TE.gather(1, idx_TK)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        if cfg.norm_topk_prob:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return w_TK * cfg.routed_scale, idx_TK, load_balancing_loss(probs_TE, idx_TK)


def group_limited(choice_TE: torch.Tensor, n_group: int, topk_group: int, rule: str = "top2") -> torch.Tensor:
    """choice_TE with every expert outside each token's topk_group best routing groups (n_group contiguous
    blocks of experts) set to -inf. A group's score: its best expert's ("max": DeepSeek-V2's
    group_limited_greedy) or its two best experts' summed ("top2": DeepSeek-V3, as transformers'
    DeepseekV3TopkRouter). n_group = 1: unchanged."""
    if n_group == 1:
        return choice_TE
    c_TGE = choice_TE.view(len(choice_TE), n_group, -1)
    score_TG = c_TGE.max(-1).values if rule == "max" else c_TGE.topk(min(2, c_TGE.shape[-1]), -1).values.sum(-1)
    keep_TG = torch.zeros_like(score_TG, dtype=torch.bool).scatter_(1, score_TG.topk(topk_group, -1).indices, True)
    return c_TGE.masked_fill(~keep_TG[..., None], float("-inf")).view_as(choice_TE)


def expert_counts(idx_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[E] int64: how many routed slots each expert received. A scatter-add, not torch.bincount: bincount's
    output shape depends on the data, which breaks a compiled graph wherever it runs."""
    idx = idx_TK.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


def load_balancing_loss(probs_TE, idx_TK):
    """Switch-Transformer auxiliary loss E * sum_e f_e * P_e: f_e the share of routed slots
    sent to expert e, P_e its mean router probability. 1.0 when perfectly balanced."""
    E = probs_TE.shape[-1]
    f_E = expert_counts(idx_TK, E).to(probs_TE.dtype) / idx_TK.numel()
    return E * (f_E * probs_TE.mean(0)).sum()


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN (the shared expert)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Standard MoE FFN layer: router, stacked SwiGLU experts, optional shared expert.

    forward(x [..., D]) -> (y [..., D], aux_loss). With a MoLAEConfig the experts are latent
    (the `MoLAE` layer); everything else is identical, so the two compare token for token.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        latent, groups = (cfg.latent_dims(), cfg.groups) if isinstance(cfg, MoLAEConfig) else ({}, 1)
        self.experts = Experts(cfg.dim, cfg.inter, cfg.n_experts, latent, groups)
        self.shared = SwiGLU(cfg.dim, cfg.shared_inter) if cfg.shared_inter else None
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_inter and cfg.shared_gate else None

    @property
    def impl(self):
        return self.experts.impl

    @impl.setter
    def impl(self, value):
        if value not in IMPLS:
            raise ValueError(f"impl={value!r} is not known: allowed {', '.join(map(repr, IMPLS))}")
        self.experts.impl = value

    def forward(self, x):
        x_TD = x.reshape(-1, self.cfg.dim)
        w_TK, idx_TK, aux_loss = self.router(x_TD)
        y_TD = self.experts(x_TD, idx_TK, w_TK)
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            y_TD = y_TD + (torch.sigmoid(self.shared_gate(x_TD)) * s_TD if self.shared_gate is not None else s_TD)
        return y_TD.view(x.shape), aux_loss


class MoLAE(MoE):
    """Mixture of Latent Experts layer (MOLAE.md §2): a `MoE` whose experts share latent projections."""

    def __init__(self, cfg: MoLAEConfig):
        if not isinstance(cfg, MoLAEConfig):
            raise TypeError(f"MoLAE takes a MoLAEConfig, got {type(cfg).__name__}: use MoLAEConfig.from_moe(cfg)")
        super().__init__(cfg)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "KINDS",
    "MoEConfig",
    "MoLAEConfig",
    "PRESETS",
    "param_counts",
    "grouped_linear",
    "Routing",
    "Experts",
    "LatentMoEExperts",
    "Router",
    "SwiGLU",
    "MoE",
    "MoLAE",
    "expert_counts",
    "load_balancing_loss",
    "multiply_out",
    "n_params",
]
