"""Converting Hugging Face MoE models in memory: swap each MoE block's `experts` submodule.

transformers 5.x gives every MoE family (qwen2_moe, qwen3_moe, mixtral, olmoe, deepseek_v2/v3,
...) an `experts` submodule called as experts(hidden_states [T, D], top_k_index [T, K],
top_k_weights [T, K]) -> [T, D], holding stacked weights

    gate_up_proj [E, 2F, D]   (gate rows first, then up: `gate, up = out.chunk(2, -1)`)
    down_proj    [E, D, F]

`molae.layers.Experts` has the same call signature, so replacing the submodule leaves each
family's router and shared-expert code untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from .factorize import latent_experts
from .layers import KINDS, Experts, check_projections, resolve_latent_dims


def is_hf_experts(module: nn.Module) -> bool:
    """A transformers stacked-experts module (fused gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every experts submodule, HF's or already ours, in model order."""
    return [(n, m) for n, m in model.named_modules() if is_hf_experts(m) or isinstance(m, Experts)]


def hf_expert_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """{gate, up: [E, F, D], down: [E, D, F]} views of a transformers experts module's weights."""
    name = type(module).__name__
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        raise ValueError(f"{name} stores transposed or biased experts: not a SwiGLU layout molae converts")
    if not getattr(module, "is_concatenated", True) or not getattr(module, "has_gate", True):
        raise ValueError(f"{name} stores interleaved or ungated experts: not a SwiGLU layout molae converts")
    act = getattr(module, "act_fn", None)
    probe = torch.linspace(-4, 4, 9)
    if act is not None and not torch.allclose(act(probe), torch.nn.functional.silu(probe)):
        raise ValueError(f"{name} uses activation {type(act).__name__}: molae's experts are SwiGLU (SiLU)")
    gate_up, down = module.gate_up_proj, module.down_proj
    E, F2, D = gate_up.shape
    if F2 % 2 or tuple(down.shape) != (E, D, F2 // 2):
        raise ValueError(f"{name}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} "
                         "are not [E, 2F, D] and [E, D, F]")
    F_ = F2 // 2
    return {"gate": gate_up[:, :F_], "up": gate_up[:, F_:], "down": down}


def standard_experts(module: nn.Module) -> Experts:
    """Our standard (unfactorized) `Experts` holding a transformers experts module's weights."""
    w = hf_expert_weights(module)
    E, F_, D = w["gate"].shape
    experts = Experts(D, F_, E).to(device=w["gate"].device, dtype=w["gate"].dtype)
    with torch.no_grad():
        for kind in KINDS:
            getattr(experts, f"{kind}_proj").copy_(w[kind])
    return experts


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def to_molae(model: nn.Module, latent_dim=None, groups: int = 1, projections=("up", "gate"),
             rank_ratio: float | None = None, *, dtype=None, progress=None) -> list[dict]:
    """Replace, in place, every experts submodule of `model` by a MoLAE `Experts`.

    latent_dim: int, {kind: int}, or None (d = m). Returns the report rows of
    `factorize_experts`, each with the submodule's name. `progress` wraps the module list
    (e.g. tqdm) when given.
    """
    projections = check_projections(projections)
    todo = find_experts(model)
    if not todo:
        raise ValueError(f"{type(model).__name__} has no MoE experts submodules to convert")
    rows = []
    for name, module in progress(todo) if progress else todo:
        weights = module.dense_weights() if isinstance(module, Experts) else hf_expert_weights(module)
        _, F_, D = weights["gate"].shape
        latent = resolve_latent_dims(latent_dim, projections, F_, D)
        experts, report = latent_experts(weights, latent, groups, rank_ratio, dtype=dtype)
        experts.impl = getattr(module, "impl", "fast")
        _set_submodule(model, name, experts)
        rows += [dict(module=name, **r) for r in report]
    return rows


def use_standard_experts(model: nn.Module) -> int:
    """Replace, in place, every transformers experts submodule by our standard `Experts`
    (same weights, our fast path). Returns how many were replaced."""
    todo = [(n, m) for n, m in find_experts(model) if not isinstance(m, Experts)]
    for name, module in todo:
        _set_submodule(model, name, standard_experts(module))
    return len(todo)


__all__ = ["is_hf_experts", "find_experts", "hf_expert_weights", "standard_experts", "to_molae",
           "use_standard_experts"]
