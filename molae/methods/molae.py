"""MoLAE (MOLAE.md §2-4): each group of experts shares one latent projection B per factorized kind,
each expert keeps A_i. Data-free, the paper's two-step algorithm (optional step-1 rank reduction, then
the group's stacked SVD); with calibration inputs, the activation-aware solution (whitened by the
inputs' Grams: down exactly optimal, gate/up B from the group's summed Gram and each A_i the exact
least squares for its own inputs), computed from the captured inputs without any E x n x n
(factorize.aware_*_streaming; factorize.aware_* on per-expert Grams is the reference). With --budget,
latent sizes per layer and kind come from every layer's spectrum (`allocates`); with --group-by
similarity, equal groups of experts whose (whitened) row spaces overlap most.
"""

from __future__ import annotations

import math

import torch

from ..factorize import (_group_gram, _top_eigh, aware_down_streaming, aware_gate_up_streaming, down_whitened_gram,
                         factorize_projection, gram_cosines, group_by_affinity, hidden_mean_gram, weight_gram, whiten)
from ..layers import KINDS, Experts, check_groups, check_latent_dim, check_projections, resolve_latent_dims
from .base import LayerOutput, LayerShape, Method, register


def _whitened(M_ERN: torch.Tensor, S_NN: torch.Tensor) -> torch.Tensor:
    """M_e @ S for every expert, one product at a time in S's dtype, into a stack of M's dtype."""
    out = torch.empty_like(M_ERN)
    for e in range(M_ERN.shape[0]):
        out[e] = (M_ERN[e].to(S_NN.dtype) @ S_NN).to(out.dtype)
    return out


class MoLAE(Method):
    name = "molae"
    latent = True
    allocates = True

    def check(self, opts):
        if opts.budget is not None and opts.latent_dim is not None:
            raise ValueError("--budget and --latent-dim both choose the latent size: give one of them")

    def groups(self, shape: LayerShape, opts) -> int:
        """G: --groups, or with --group-by routing the router's n_group (MoLAE groups = routing groups, so a
        token routed within topk_group groups runs at most topk_group shared projections)."""
        if opts.group_by != "routing":
            return opts.groups
        if shape.n_group == 1:
            raise ValueError("--group-by routing: this model's router has no expert groups (n_group 1): "
                             "give --groups G with --group-by index or similarity")
        if opts.groups not in (1, shape.n_group):
            raise ValueError(f"--group-by routing sets G to the router's n_group = {shape.n_group}: leave out "
                             f"--groups {opts.groups}")
        return shape.n_group

    def plan(self, shape: LayerShape, opts) -> dict:
        G = self.groups(shape, opts)
        try:
            check_groups(G, shape.experts)
        except ValueError as e:
            raise ValueError(f"--groups: {e}") from None
        kinds = check_projections(opts.projections)
        latent = dict.fromkeys(kinds, 1) if opts.budget is not None else \
            resolve_latent_dims(opts.latent_dim, kinds, shape.inter, shape.dim)
        for kind, d in latent.items():
            try:
                check_latent_dim(d, shape.experts // G * shape.inter, shape.dim, name="latent_dim")
            except ValueError as e:
                raise ValueError(f"--latent-dim for layer {shape.layer}: {e}") from None
        if opts.group_choices is None:
            return dict(latent=latent, groups=G)
        choices = sorted({shape.experts if c == "E" else int(c) for c in opts.group_choices})
        bad = [c for c in choices if c < 1 or shape.experts % c]
        if bad:
            raise ValueError(f"--group-choices {bad[0]} does not divide layer {shape.layer}'s {shape.experts} "
                             "experts: give divisors of E (or E itself, one latent per expert)")
        return dict(latent=latent, groups=choices[0], group_choices=choices)

    # ---- grouping
    def _perm(self, W, inputs, spec: dict, opts) -> torch.Tensor | None:
        """Slot order of the experts (similarity groups), computed once and kept in spec. One kind at a time;
        gate/up whitened by the layer's inputs one expert at a time into a stack of the weights' dtype (at
        DeepSeek-V3 shapes in bf16: 7.5 GB beside the layer's weights, not a float64 copy of 30 GB per kind)."""
        if opts.group_by != "similarity" or spec["groups"] in (1, W["gate"].shape[0]):  # one group, or one each
            return None
        if "perm" not in spec:
            S = None if inputs is None else whiten(inputs.total_gram() + inputs.E * inputs.prior * inputs.mean_gram(),
                                                   opts.damp)
            aff = 0
            for kind in spec["latent"] or KINDS:
                M = W[kind].transpose(1, 2) if kind == "down" else W[kind]  # rows in R^n
                if S is not None and kind != "down":
                    M = _whitened(M, S)
                aff = aff + gram_cosines(M)
                del M
            spec["perm"] = group_by_affinity(aff, spec["groups"]).tolist()
        return torch.tensor(spec["perm"], device=W["gate"].device)

    def _members(self, spec, E, g, perm):
        Eg = E // spec["groups"]
        ids = torch.arange(E) if perm is None else perm.cpu()
        return ids[g * Eg:(g + 1) * Eg].tolist()

    def _group(self, Wk: torch.Tensor, spec, g: int, perm) -> torch.Tensor:
        """Group g's experts of one kind: a view of the stack when groups are by index (no copy of a
        layer's experts, 7.5 GB a kind at DeepSeek-V3 shapes), a gather when they are permuted."""
        Eg = Wk.shape[0] // spec["groups"]
        if perm is None:
            return Wk[g * Eg:(g + 1) * Eg]
        return Wk[perm[g * Eg:(g + 1) * Eg].to(Wk.device)]

    # ---- spectra for --budget
    def spectra(self, W, inputs, spec, opts) -> dict[str, torch.Tensor]:
        """Squared singular values of each factorized kind's (whitened) group stacks, summed over groups."""
        perm = self._perm(W, inputs, spec, opts)
        E = W["gate"].shape[0]
        h_mean = hidden_mean_gram(inputs, W) if inputs is not None and "down" in spec["latent"] else None
        out = {}
        for kind in spec["latent"]:
            sig = []
            for g in range(spec["groups"]):
                ex = self._members(spec, E, g, perm)
                Wg = self._group(W[kind], spec, g, perm)
                if inputs is None:
                    sig.append(_top_eigh(weight_gram(Wg, kind))[0])
                elif kind == "down":
                    sig.append(_top_eigh(down_whitened_gram(Wg, inputs, ex, W, h_mean, opts.damp))[0])
                else:
                    S = whiten(_group_gram(inputs, ex) + len(ex) * inputs.prior * inputs.mean_gram(), opts.damp)
                    sig.append(_top_eigh(S.T @ weight_gram(Wg, kind) @ S)[0])
            out[kind] = torch.stack([s.cpu() for s in sig]).sum(0)
        return out

    # ---- conversion
    def convert(self, W, inputs, spec, opts) -> LayerOutput:
        E, F_, D = W["gate"].shape
        dtype = W["gate"].dtype
        perm = self._perm(W, inputs, spec, opts)
        layer = spec.get("layer")
        params, rows = {}, []
        h_mean = hidden_mean_gram(inputs, W) if inputs is not None and "down" in spec["latent"] else None
        for kind in KINDS:
            d = spec["latent"].get(kind)
            if inputs is None or d is None:
                try:
                    p, row = factorize_projection(W[kind], kind, d, spec["groups"], opts.rank_ratio,
                                                  perm=perm, damp=opts.damp)
                except ValueError as e:
                    raise ValueError(f"layer {layer}: {e}") from None
                params.update(p)
                rows.append(dict(layer=layer, **row))
                continue
            p, row = self._aware(W, kind, d, inputs, spec, perm, h_mean, opts, dtype)
            params.update(p)
            rows.append(dict(layer=layer, **row))
        if perm is not None:  # router id -> slot
            params["expert_slot"] = torch.argsort(perm)
        params = {k: v.to(dtype) if v.is_floating_point() else v for k, v in params.items()}
        with torch.device("meta"):
            module = Experts(D, F_, E, dict(spec["latent"]), spec["groups"], perm is not None)
        module.load_state_dict(params, strict=True, assign=True)  # shares the factors' storage: no second copy
        record = dict(latent=dict(spec["latent"]), groups=spec["groups"])
        if perm is not None:
            record["permuted"] = True
        return LayerOutput(rows=rows, latent=params, module=module, record=record)

    def _aware(self, W, kind, d, inputs, spec, perm, h_mean, opts, dtype):
        """One kind, activation-aware, group by group; the report row as factorize_projection's (the
        weight-space error of the factors as stored, in `dtype`)."""
        E = W[kind].shape[0]
        As, Bs = [], []
        err2 = total2 = out_err2 = out_total2 = 0.0
        for g in range(spec["groups"]):
            ex = self._members(spec, E, g, perm)
            Wg = self._group(W[kind], spec, g, perm)
            if kind == "down":
                A, B, _, (e2, t2) = aware_down_streaming(Wg, d, inputs, ex, W, h_mean, opts.damp, dtype)
            else:
                A, B, _, (e2, t2) = aware_gate_up_streaming(Wg, d, inputs, ex, opts.damp, dtype)
            B = B.to(dtype)
            out_err2, out_total2 = out_err2 + e2, out_total2 + t2
            for i in range(0, len(ex), 8):  # weight-space error against the originals, a few experts at a time
                Wc = Wg[i:i + 8].double()
                W_hat = B.double() @ A[i:i + 8].double() if kind == "down" else A[i:i + 8].double() @ B.double()
                err2 += (Wc - W_hat).square().sum().item()
                total2 += Wc.square().sum().item()
            As.append(A)
            Bs.append(B)
        params = {f"{kind}_A": torch.cat(As), f"{kind}_B": torch.stack(Bs)}
        total2 = max(total2, torch.finfo(torch.float64).tiny)
        return params, dict(kind=kind, latent_dim=d, groups=spec["groups"], rel_error=math.sqrt(err2 / total2),
                            energy_kept=1 - err2 / total2, params_before=W[kind].numel(),
                            params_after=sum(t.numel() for t in params.values()),
                            rel_output_error=math.sqrt(out_err2 / max(out_total2, 1e-300)))


register(MoLAE())

__all__ = ["MoLAE"]
