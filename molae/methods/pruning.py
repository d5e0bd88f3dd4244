"""Expert pruning: keep the round(fraction * E) experts (at least top-k) that score highest, the router's
rows of the others dropped: a smaller model of the same family. Two scores, as REAP's authors compute them
(CerebrasResearch/reap, src/reap/observer.py, `MoETransformerObserver._hook_fn`):

- prune-frequency: "expert_frequency", the number of calibration tokens routed to the expert;
- prune-reap: "reap" (Lasby et al. 2025, "REAP the Experts"), the mean over the expert's routed tokens of
  softmax(router logits)_e x ||E_e(x)||_2: the router's probability over all experts (not renormalized over
  the top-k, their default `renormalize_router_weights=False`) times the norm of the expert's output.

Deviations: the number kept is round(fraction * E) with at least top-k (REAP prunes int(E x ratio), and
nothing stops it below top-k); statistics come from the layer-by-layer pipeline on --calibration data (the
unpruned model's hidden states by default, as REAP observes them; not with `--calib-carry converted`).
"""

from __future__ import annotations

import torch

from .base import LayerOutput, Method, dense_rows, register


def keep_experts(count: torch.Tensor, fraction: float, top_k: int, rule: str, reap: torch.Tensor | None = None):
    """Indices (ascending) of the experts to keep."""
    count = count.double()
    E = count.numel()
    keep = max(top_k, round(fraction * E))
    if keep > E:
        raise ValueError(f"--budget {fraction} keeps {keep} of {E} experts: choose a budget below 1")
    if rule == "prune-frequency":
        score = count
    elif rule == "prune-reap":
        score = reap.double() / count.clamp_min(1)
    else:
        raise ValueError(f"pruning rule {rule!r} is not known: use prune-frequency or prune-reap")
    order = torch.argsort(score, descending=True, stable=True)
    return sorted(order[:keep].tolist())


class Prune(Method):
    calibration = "required"
    prunes = True

    def __init__(self, name: str):
        self.name = name

    def check(self, opts):
        if opts.budget is None:
            raise ValueError(f"--method {self.name} needs --budget FRACTION (the routed-expert parameters to keep)")
        if opts.layers not in (None, "all"):
            raise ValueError(f"--method {self.name} changes the model's expert count: it prunes all layers, "
                             "leave out --layers")

    def plan(self, shape, opts):
        return dict(top_k=shape.top_k)

    def convert(self, W, inputs, spec, opts) -> LayerOutput:
        reap = inputs.reap(W) if self.name == "prune-reap" else None
        keep = keep_experts(inputs.count, opts.budget, spec["top_k"], self.name, reap)
        idx = torch.tensor(keep, device=W["gate"].device)
        out = {k: v[idx] for k, v in W.items()}
        rows = dense_rows(spec.get("layer"), self.name, W, out, {k: v.numel() for k, v in out.items()},
                          dict(layer=dict(kept=keep)))
        # carried forward: the original layer (a pruned router cannot run inside the family's block)
        return LayerOutput(rows=rows, dense=out, keep=keep)


register(Prune("prune-frequency"))
register(Prune("prune-reap"))
