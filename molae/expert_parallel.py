"""Expert parallelism for `layers.Experts` (standard and MoLAE) over a torch.distributed process group.

Each of R EP ranks holds E/R consecutive experts' per-expert tensors (the A's, or whole matrices) and a copy of
every group's shared B; each rank routes its own tokens. A token is sent once per *unit* it reaches: a unit is
the experts of one rank that share one B, i.e. V = max(G, R) units of E/V experts (G = 1: a unit per rank; G a
multiple of R: a unit per group). What travels (MOLAE.md §2):

    dispatch, per (token, unit): B_gate x and B_up x (2 L numbers) where gate and up are factorized, x (D) if
                                 either is kept whole; standard experts send x
    combine, per (token, unit):  u = sum_k w_k A_down,k h_k (L numbers) if down is factorized (summed over the
                                 unit's experts in latent space, B_down applied once at the sender), else
                                 y = sum_k w_k W_down,k h_k (D numbers)

plus routing metadata (each pair's local expert ids and weights, K numbers each), counted apart. The exchange is
`all_to_all_single_autograd` (torch's functional collective: its backward is the reverse exchange); the
split sizes are exchanged first and read on the host (one sync per layer call: gloo and NCCL's
all_to_all_single take Python split lists).

Gradients: the A's (and whole matrices) of a rank's experts get their full gradient on that rank; the replicated
B's get the gradient of the rank's own tokens, to be summed over ranks like any data-parallel parameter
(`sync_replicated_grads`). The slow, obvious reference is the single-process `Experts` on all ranks' tokens.

Legend: T local tokens, K top-k, D hidden, F inter, L latent, E experts, R ranks, V units, P pairs this rank
sends, Q pairs it receives, S (pair, k) slots of the local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .kernels import swiglu_weighted
from .layers import KINDS, Experts, grouped_linear, param_shapes


def check_ep(n_experts: int, groups: int, ranks: int):
    if n_experts % ranks:
        raise ValueError(f"{n_experts} experts do not split over {ranks} EP ranks: use an EP size that divides "
                         f"{n_experts}")
    if groups > 1 and groups % ranks:
        raise ValueError(f"{groups} groups over {ranks} EP ranks: use G = 1 or a multiple of the EP size")


def _all_to_all(x: torch.Tensor, out_rows: list[int], in_rows: list[int], group) -> torch.Tensor:
    """Differentiable (its backward is the reverse exchange); torch's functional collective, waited on here."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_rows, in_rows, group or dist.group.WORLD))


def _exchange_plain(x: torch.Tensor, out_rows: list[int], in_rows: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_rows), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_rows, in_rows, group=group)
    return out


class ExpertParallelExperts(nn.Module):
    """One EP rank's share of an `Experts` module, with its call signature:
    forward(hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D] for this rank's tokens.
    `last_traffic` holds the elements this rank sent in its last call (see `traffic`)."""

    def __init__(self, dim: int, inter: int, n_experts: int, latent: dict[str, int] | None = None, groups: int = 1,
                 group=None, device=None, dtype=None):
        """This rank's tensors, allocated at their local sizes (so a real-sized layer never exists whole on one
        rank) and drawn as `Experts.reset_parameters()` draws them (std = fan_in ** -0.5)."""
        super().__init__()
        R, r = dist.get_world_size(group), dist.get_rank(group)
        check_ep(n_experts, groups, R)
        self.group, self.ranks, self.rank = group, R, r
        self.dim, self.inter, self.n_experts, self.groups = dim, inter, n_experts, groups
        self.latent = {k: latent[k] for k in KINDS if k in (latent or {})}
        self.units = max(groups, R)
        for name, shape in param_shapes(dim, inter, n_experts // R, self.latent, groups).items():
            w = torch.empty(shape, device=device, dtype=dtype)
            self.register_parameter(name, nn.Parameter(nn.init.normal_(w, std=shape[-1] ** -0.5)))
        self.last_traffic: dict[str, int] = {}
        self.clock = None  # a benchmark's phase clock (molae/bench/ep.py): mark(name) after each phase

    @classmethod
    def from_experts(cls, full: Experts, group=None) -> "ExpertParallelExperts":
        """This rank's share of a whole `Experts` module (the same on every rank): its experts' slices of the
        per-expert tensors, every group's B."""
        ep = cls(full.dim, full.inter, full.n_experts, full.latent, full.groups, group, device="meta")
        lo, hi = ep.rank * full.n_experts // ep.ranks, (ep.rank + 1) * full.n_experts // ep.ranks
        local = ep.local_params()
        for name, p in full.named_parameters():  # this rank's experts' slices; the B's whole (replicated)
            setattr(ep, name, nn.Parameter((p.detach()[lo:hi] if name in local else p.detach()).clone()))
        if hasattr(full, "expert_slot"):
            ep.register_buffer("expert_slot", full.expert_slot.clone())
        return ep

    def local_params(self) -> dict[str, nn.Parameter]:
        """The per-expert tensors (A's, whole matrices): this rank's experts only. The rest, the B's, are
        replicated on every rank."""
        return {n: p for n, p in self.named_parameters() if not n.endswith("_B")}

    def sync_replicated_grads(self):
        """Sum the replicated B's gradients over the EP ranks (each holds its own tokens' part)."""
        local = self.local_params()
        for n, p in self.named_parameters():
            if n not in local and p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)

    def widths(self) -> tuple[int, int]:
        """Numbers per (token, unit) pair: (dispatch, combine)."""
        latent_in = [k for k in ("gate", "up") if k in self.latent]
        dispatch = sum(self.latent[k] for k in latent_in) + (self.dim if len(latent_in) < 2 else 0)
        return dispatch, self.latent.get("down", self.dim)

    def _mark(self, name: str):
        if self.clock is not None:
            self.clock.mark(name)

    def expert_slot_of(self, idx_TK: torch.Tensor) -> torch.Tensor:
        """Router ids -> the slots that hold the experts' tensors (units are ranges of slots)."""
        return self.expert_slot[idx_TK] if hasattr(self, "expert_slot") else idx_TK

    def group_of(self, v_P: torch.Tensor) -> torch.Tensor:
        """The group (the shared B) of each pair's unit."""
        return v_P * self.groups // self.units

    def _project(self, kind: str, x_PD: torch.Tensor, g_P: torch.Tensor) -> torch.Tensor:
        B_GLD = getattr(self, f"{kind}_B")
        if self.groups == 1:
            return x_PD @ B_GLD[0].T
        return torch.bmm(x_PD[:, None], B_GLD[g_P].transpose(1, 2))[:, 0]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        x_TD, w_TK = hidden_states, top_k_weights.to(hidden_states.dtype)
        T, K = top_k_index.shape
        E, R, V = self.n_experts, self.ranks, self.units
        e_TK = self.expert_slot_of(top_k_index)
        per_unit, per_rank = E // V, E // R
        unit_TK = e_TK // per_unit
        # pairs (token, unit), sorted by unit and so by destination rank
        reach_TV = torch.zeros(T, V, dtype=torch.bool, device=x_TD.device)
        reach_TV[torch.arange(T, device=x_TD.device)[:, None], unit_TK] = True
        v_P, t_P = reach_TV.T.nonzero(as_tuple=True)
        mine_PK = unit_TK[t_P] == v_P[:, None]
        ids_PK = torch.where(mine_PK, e_TK[t_P] % per_rank, -1)  # the destination rank's local expert, or -1
        wts_PK = torch.where(mine_PK, w_TK[t_P], 0)
        g_P = self.group_of(v_P)
        x_PD = x_TD[t_P]
        parts = [self._project(k, x_PD, g_P) for k in ("gate", "up") if k in self.latent]
        if len(parts) < 2:
            parts.append(x_PD)
        send_PW = torch.cat(parts, 1)
        self._mark("route")

        dest_P = v_P // (V // R)
        send_rows = torch.bincount(dest_P, minlength=R)
        recv_rows = torch.empty_like(send_rows)
        dist.all_to_all_single(recv_rows, send_rows, group=self.group)
        sr, rr = send_rows.tolist(), recv_rows.tolist()  # the host needs the split sizes
        recv_QW = _all_to_all(send_PW, rr, sr, self.group)
        ids_QK = _exchange_plain(ids_PK, rr, sr, self.group)
        wts_QK = _all_to_all(wts_PK, rr, sr, self.group)  # differentiable: the router learns through it
        self._mark("dispatch")
        back_QC = self._local_experts(recv_QW, ids_QK, wts_QK)
        self._mark("experts")
        back_PC = _all_to_all(back_QC, sr, rr, self.group)
        self._mark("combine")

        remote = sum(n for i, n in enumerate(sr) if i != self.rank)
        dw, cw = self.widths()
        self.last_traffic = dict(pairs=len(t_P), remote_pairs=remote, dispatch=remote * dw, combine=remote * cw,
                                 metadata=remote * 2 * K)
        y_TD = self._finish(back_PC, t_P, g_P, x_TD)
        self._mark("finish")
        return y_TD

    def _finish(self, back_PC, t_P, g_P, x_TD) -> torch.Tensor:
        """Each token's pairs summed: y directly, or latent u summed per group, then B_down once per group."""
        if "down" not in self.latent:
            return torch.zeros_like(x_TD).index_add(0, t_P, back_PC)
        if self.groups == 1:
            u_TL = back_PC.new_zeros(x_TD.shape[0], back_PC.shape[1]).index_add(0, t_P, back_PC)
            return u_TL @ self.down_B[0].T
        y_PD = torch.bmm(self.down_B[g_P], back_PC[:, :, None])[:, :, 0]
        return torch.zeros_like(x_TD).index_add(0, t_P, y_PD)

    def _local_experts(self, recv_QW, ids_QK, wts_QK) -> torch.Tensor:
        """This rank's experts on the pairs it received: [Q, W] -> [Q, L_down or D]."""
        q_S, k_S = (ids_QK >= 0).nonzero(as_tuple=True)
        e_S = ids_QK[q_S, k_S]
        order = torch.argsort(e_S, stable=True)
        q_S, e_S, w_S = q_S[order], e_S[order], wts_QK[q_S[order], k_S[order]]
        counts = torch.bincount(e_S, minlength=self.n_experts // self.ranks)
        offs_E = torch.cumsum(counts, 0).to(torch.int32)
        z_SW = recv_QW[q_S]
        col, inputs = 0, {}
        for kind in ("gate", "up"):
            if kind in self.latent:
                inputs[kind] = z_SW[:, col:col + self.latent[kind]]
                col += self.latent[kind]
        for kind in ("gate", "up"):
            inputs.setdefault(kind, z_SW[:, col:])  # whole kinds read the hidden state, sent last

        def weight(kind):
            return getattr(self, f"{kind}_A" if kind in self.latent else f"{kind}_proj")

        gate_SF = grouped_linear(inputs["gate"], weight("gate"), offs_E)
        up_SF = grouped_linear(inputs["up"], weight("up"), offs_E)
        h_SF = swiglu_weighted(gate_SF, up_SF, w_S)
        out_SC = grouped_linear(h_SF, weight("down"), offs_E)
        return out_SC.new_zeros(recv_QW.shape[0], out_SC.shape[1]).index_add(0, q_S, out_SC)


def traffic(idx_TK: torch.Tensor, n_experts: int, groups: int, ranks: int, rank: int, widths: tuple[int, int]) -> dict:
    """The formula: elements a rank sends to other ranks for its tokens' routing idx_TK (expert slots)."""
    V = max(groups, ranks)
    units = {(t, int(e) // (n_experts // V)) for t, row in enumerate(idx_TK.tolist()) for e in row}
    remote = sum(1 for _, v in units if v // (V // ranks) != rank)
    return dict(remote_pairs=remote, dispatch=remote * widths[0], combine=remote * widths[1],
                metadata=remote * 2 * idx_TK.shape[1])
