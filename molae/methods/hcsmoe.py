"""HC-SMoE (Chen et al. 2024, "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering"), as its
authors run it on Mixtral (wazenmai/HC-SMoE, scripts/mixtral/run.sh: --dominant no --similarity_base
expert-output --cluster hirarchical --linkage average --merge fix-dom-same --ingredient act+weight
--mode all; the merge is `_merge_moe_experts_with_dominant_same_rule` in hcsmoe/merging/grouping_mixtral.py):

1. Cluster. Each expert's output averaged over every token of the layer's calibration inputs (routed to it
   or not); hierarchical clustering with average linkage on Euclidean distances, down to round(f E)
   clusters. A cluster's dominant expert is the member whose mean output is closest to the cluster's mean.
2. Merge ("fix-dom-same", same rule for gate, up and down). The cluster's data is every member's routed
   inputs scaled by the router's probability for it ("all": activation-with-router-logits), at most
   50,000 rows drawn at random; each member's coefficient is its share of those rows ("input-weight").
   Every neuron of a non-dominant member is aligned to the dominant neuron it correlates with most: the
   Pearson correlation of their SwiGLU activations on the data plus that of their weight columns
   ([W_gate^T; W_down; W_up^T]). Merged neuron p is the coefficient-weighted average of dominant neuron p
   and the neurons aligned to it (rows of a normalized assignment matrix applied to the stacked weights).
Every expert of a cluster then computes the merged expert (the router is unchanged), so the layer stores one
expert per cluster. A singleton cluster keeps its expert as it is.

Deviations: a dominant expert that no calibration token was routed to gets coefficient 0, and the neurons
nothing aligns to would divide 0 by 0 (NaN weights in the authors' code); they keep the dominant neuron (the
rule's limit as that coefficient goes to zero). The authors collect statistics on 32 C4 sequences of 2048
tokens through the whole model; here the layer's inputs come from the layer-by-layer pipeline on --calibration
data (the original model's hidden states by default, as the authors'; `--calib-carry converted` gives the merged
earlier layers' outputs)."""

from __future__ import annotations

import torch

from .base import LayerOutput, Method, dense_rows, register, standard_module


def average_linkage(X_ED: torch.Tensor, clusters: int) -> list[int]:
    """Cluster label per row of X by agglomerative clustering with average linkage, down to `clusters`."""
    E = X_ED.shape[0]
    if not 1 <= clusters <= E:
        raise ValueError(f"{clusters} clusters of {E} experts: allowed 1..{E}")
    dist = torch.cdist(X_ED.double(), X_ED.double())
    members = {i: [i] for i in range(E)}
    while len(members) > clusters:
        keys = sorted(members)
        best = None
        for a_i, a in enumerate(keys):
            for b in keys[a_i + 1:]:
                dab = dist[members[a]][:, members[b]].mean().item()
                if best is None or dab < best[0]:
                    best = (dab, a, b)
        _, a, b = best
        members[a] += members.pop(b)
    labels = [0] * E
    for c, key in enumerate(sorted(members)):
        for i in members[key]:
            labels[i] = c
    return labels


def pearson(a_RN: torch.Tensor, b_RM: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[N, M] Pearson correlations between the columns of a and of b over their R rows (float64)."""
    a, b = a_RN.double(), b_RM.double()
    a, b = a - a.mean(0), b - b.mean(0)
    cov = a.T @ b / max(a.shape[0] - 1, 1)
    return cov / (a.std(0)[:, None] * b.std(0)[None, :] + eps)


def dominants(features_ED: torch.Tensor, labels: list[int]) -> dict[int, int]:
    """{cluster: the member whose feature is closest to the cluster's mean} (HC-SMoE's dominant expert)."""
    out = {}
    lab = torch.tensor(labels)
    for c in lab.unique().tolist():
        members = (lab == c).nonzero().squeeze(1)
        f = features_ED[members].double()
        out[c] = int(members[(f - f.mean(0)).norm(dim=1).argmin()])
    return out


def merge_fix_dom_same(W: dict[str, torch.Tensor], members: list[int], X_TD: torch.Tensor,
                       coefs: list[float]) -> dict[str, torch.Tensor]:
    """One cluster's merged expert {gate [m, n], up [m, n], down [n, m]} (float64); members[0] is the dominant."""
    m = W["gate"].shape[1]
    Wg, Wu, Wd = (torch.stack([W[k][e].double() for e in members]) for k in ("gate", "up", "down"))
    X = X_TD.double()
    act = [torch.nn.functional.silu(X @ Wg[j].T) * (X @ Wu[j].T) for j in range(len(members))]  # [T, m] each
    wfeat = [torch.cat([Wg[j].T, Wd[j], Wu[j].T]) for j in range(len(members))]  # [3n, m]: a column per neuron
    P = torch.zeros(m, m * len(members), dtype=torch.float64, device=X.device)
    P[torch.arange(m), torch.arange(m)] = coefs[0]
    for j in range(1, len(members)):
        corr = pearson(act[0], act[j]) + pearson(wfeat[0], wfeat[j])  # [dominant neuron, member neuron]
        P[corr.argmax(0), j * m + torch.arange(m, device=X.device)] = coefs[j]
    # A dominant with no routed calibration rows (coefficient 0) leaves its unmatched neurons' rows empty; the
    # authors' division makes those 0/0 (NaN: the Mixtral-style reference, H200 2026-12-02). Such a row keeps
    # the dominant neuron alone, the limit of the rule as that coefficient goes to zero from above.
    empty = (P.sum(1) == 0).nonzero().squeeze(1)
    P[empty, empty] = 1.0
    P = P / P.sum(1, keepdim=True)
    return dict(gate=P @ Wg.reshape(-1, Wg.shape[-1]), up=P @ Wu.reshape(-1, Wu.shape[-1]),
                down=(P @ Wd.transpose(1, 2).reshape(-1, Wd.shape[1])).T)


def merge(W: dict[str, torch.Tensor], inputs, fraction: float, data_limit: int = 50000, seed: int = 0):
    """Merge one layer's experts ({kind: [E, ...]}) into round(fraction * E) clusters (module notes).
    Returns (merged {kind: [E, ...]} with each expert's cluster weights, stored parameters, labels, dominants)."""
    E = W["gate"].shape[0]
    clusters = max(1, round(fraction * E))
    features = inputs.mean_outputs(W)
    labels = average_linkage(features, clusters)
    dom = dominants(features, labels)
    gen = torch.Generator().manual_seed(seed)
    merged = {k: torch.empty_like(v, dtype=torch.float64) for k, v in W.items()}
    for c, d in dom.items():
        members = [d] + [e for e in range(E) if labels[e] == c and e != d]
        if len(members) == 1:
            one = {k: W[k][d].double() for k in W}
        else:
            X = torch.cat([inputs.inputs(e) * inputs.router_probs(e)[:, None] for e in members])
            X = X[torch.randperm(len(X), generator=gen)[:data_limit].to(X.device)]
            counts = torch.tensor([float(inputs.count[e]) for e in members])
            coefs = (counts / counts.sum().clamp_min(1)).tolist()
            one = merge_fix_dom_same(W, members, X, coefs)
        for k in W:
            merged[k][members] = one[k].to(merged[k].device)
    per_expert = sum(v[0].numel() for v in W.values())
    return merged, clusters * per_expert, labels, dom


class HCSMoE(Method):
    name = "hcsmoe"
    calibration = "required"

    def check(self, opts):
        if opts.budget is None:
            raise ValueError("--method hcsmoe needs --budget FRACTION (the routed-expert parameters to keep)")

    def convert(self, W, inputs, spec, opts) -> LayerOutput:
        merged, total, labels, dom = merge(W, inputs, opts.budget)
        out = {k: v.to(W[k].dtype) for k, v in merged.items()}
        rows = dense_rows(spec.get("layer"), self.name, W, out, dict.fromkeys(out, total // 3),
                          dict(layer=dict(clusters=labels, dominants=dom)))
        return LayerOutput(rows=rows, dense=out, module=standard_module(out, W["gate"].dtype))


register(HCSMoE())
