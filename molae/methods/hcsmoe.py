"""HC-SMoE (Chen et al. 2024, "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering"):
experts clustered by their average output on calibration data (hierarchical clustering, average
linkage, Euclidean distance), each cluster merged into one expert by a frequency-weighted average of
its weights. Every expert of a cluster then computes the merged expert (the router is unchanged),
so the merged layer stores one expert per cluster."""

from __future__ import annotations

import torch

from . import LayerOutput, Method, dense_rows, register, standard_module


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


def merge(weights: dict[str, torch.Tensor], mean_out_ED: torch.Tensor, count_E: torch.Tensor, fraction: float):
    """Merge one layer's experts ({kind: [E, ...]}) into round(fraction * E) clusters.
    Returns (merged {kind: [E, ...]} with each expert's cluster weights, stored parameters, labels)."""
    E = weights["gate"].shape[0]
    clusters = max(1, round(fraction * E))
    labels = torch.tensor(average_linkage(mean_out_ED, clusters))
    freq = count_E.double() + 1e-9  # an expert never routed still counts a little
    merged = {}
    for kind, W in weights.items():
        out = torch.empty_like(W, dtype=torch.float64)
        for c in range(clusters):
            idx = (labels == c).nonzero().squeeze(1)
            w = (freq[idx] / freq[idx].sum()).to(W.device)
            out[idx.to(W.device)] = torch.einsum("e,e...->...", w, W[idx.to(W.device)].double())
        merged[kind] = out
    per_expert = sum(W[0].numel() for W in weights.values())
    return merged, clusters * per_expert, labels.tolist()


class HCSMoE(Method):
    name = "hcsmoe"
    calibration = "required"

    def check(self, opts):
        if opts.budget is None:
            raise ValueError("--method hcsmoe needs --budget FRACTION (the routed-expert parameters to keep)")

    def convert(self, W, inputs, spec, opts) -> LayerOutput:
        merged, total, labels = merge(W, inputs.mean_outputs(W), inputs.count, opts.budget)
        out = {k: v.to(W[k].dtype) for k, v in merged.items()}
        rows = dense_rows(spec.get("layer"), self.name, W, out, dict.fromkeys(out, total // 3),
                          dict(layer=dict(clusters=labels)))
        return LayerOutput(rows=rows, dense=out, module=standard_module(out, W["gate"].dtype))


register(HCSMoE())
