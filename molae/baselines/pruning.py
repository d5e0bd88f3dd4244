"""Expert pruning: keep the round(fraction * E) experts (at least top-k) that score highest, by router
frequency (tokens routed on calibration data) or by REAP saliency (Lasby et al. 2025, "REAP the
Experts": the mean over an expert's routed tokens of gate weight times the norm of its output)."""

from __future__ import annotations

import torch


def keep_experts(stats: dict, fraction: float, top_k: int, rule: str) -> list[int]:
    """Indices (ascending) of the experts to keep."""
    count = stats["count"].double()
    E = count.numel()
    keep = max(top_k, round(fraction * E))
    if keep > E:
        raise ValueError(f"--budget {fraction} keeps {keep} of {E} experts: choose a budget below 1")
    if rule == "prune-frequency":
        score = count
    elif rule == "prune-reap":
        score = stats["reap"].double() / count.clamp_min(1)
    else:
        raise ValueError(f"pruning rule {rule!r} is not known: use prune-frequency or prune-reap")
    order = torch.argsort(score, descending=True, stable=True)
    return sorted(order[:keep].tolist())
