"""The protocol every compression method implements, and the registry (see molae/methods/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerShape:
    layer: int
    experts: int  # E
    inter: int  # m
    dim: int  # n
    top_k: int
    n_group: int = 1  # the router's groups (DeepSeek-V2/V3 n_group): contiguous blocks of E / n_group experts


@dataclass
class LayerOutput:
    """What a method makes of one layer. Exactly one of `latent` and `dense` is set."""

    rows: list[dict]  # report rows, one per projection kind
    latent: dict[str, torch.Tensor] | None = None  # `layers.Experts` tensors by name (gate_A, up_B, expert_slot ...)
    dense: dict[str, torch.Tensor] | None = None  # whole experts {kind: [E', ...]}, written in the source layout
    keep: list[int] | None = None  # kept experts, for a method that prunes
    module: nn.Module | None = None  # an experts module computing the converted layer (carried forward), or None
    record: dict = field(default_factory=dict)  # what config.json records for the layer


class Method:
    name = ""
    calibration = "optional"
    latent = False
    prunes = False
    allocates = False

    def check(self, opts) -> None:
        """Options this method cannot take: a ValueError naming the option and the fix."""

    def plan(self, shape: LayerShape, opts) -> dict:
        return {}

    def spectra(self, W, inputs, spec: dict, opts) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} does not allocate a budget across layers")

    def convert(self, W: dict[str, torch.Tensor], inputs, spec: dict, opts) -> LayerOutput:
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"--method {name} is not known: allowed {', '.join(METHODS)}")
    return METHODS[name]


def dense_rows(layer: int, name: str, W: dict, out: dict, stored: dict, info: dict) -> list[dict]:
    """Report rows of a method that writes whole matrices: relative Frobenius error per kind (for pruning,
    the dropped experts' share of the weights' norm) and what the method stores against what is written."""
    rows = []
    for kind in ("gate", "up", "down"):
        Wd, Od = W[kind].double(), out[kind].double()
        if Od.shape[0] != Wd.shape[0]:  # pruned
            err = (1 - Od.square().sum() / Wd.square().sum().clamp_min(1e-300)).clamp_min(0).sqrt()
        else:
            err = (Wd - Od).norm() / Wd.norm().clamp_min(1e-300)
        rows.append(dict(layer=layer, kind=kind, method=name, rel_error=err.item(), latent_dim=None,
                         params_before=W[kind].numel(), params_after=int(stored[kind]),
                         params_on_disk=out[kind].numel(), info=info.get(kind, info.get("layer", {}))))
    return rows


def standard_module(dense: dict[str, torch.Tensor], dtype) -> nn.Module:
    """Our standard `Experts` holding whole expert weights (a dense method's layer, carried forward)."""
    from ..factorize import latent_experts

    experts, _ = latent_experts({k: v.to(dtype) for k, v in dense.items()}, {})
    return experts
