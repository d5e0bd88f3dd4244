"""MoLAE inside Hugging Face transformers: swap each MoE block's `experts` submodule.

transformers 5.x gives every MoE family (qwen2_moe, qwen3_moe, mixtral, olmoe, deepseek_v2/v3,
...) an `experts` submodule called as experts(hidden_states [T, D], top_k_index [T, K],
top_k_weights [T, K]) -> [T, D], holding stacked weights

    gate_up_proj [E, 2F, D]   (gate rows first, then up: `gate, up = out.chunk(2, -1)`)
    down_proj    [E, D, F]

`molae.layers.Experts` has the same call signature, so replacing the submodule leaves each
family's router and shared-expert code untouched. The same swap defines the MoLAE model types:
for each family X, `molae_X` is X's config and causal-LM class whose __init__ installs MoLAE
experts in the layers that the config's `molae` section lists. `import molae` registers them
with transformers' Auto classes, and registers X's own checkpoint conversion mapping for
`molae_X`, so the renames X's checkpoints need (e.g. Mixtral's block_sparse_moe -> mlp) apply.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .factorize import latent_experts
from .families import SUPPORTED, split_gate_up
from .spec import LayerSpec, MolaeSpec
from .layers import Experts, LatentMoEExperts, check_projections, resolve_latent_dims


def is_hf_experts(module: nn.Module) -> bool:
    """A transformers stacked-experts module (fused gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every experts submodule, HF's or already ours, in model order."""
    from .expert_parallel import ExpertParallelExperts

    return [(n, m) for n, m in model.named_modules()
            if is_hf_experts(m) or isinstance(m, (Experts, ExpertParallelExperts))]


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
    gate, up = split_gate_up(gate_up)
    return {"gate": gate, "up": up, "down": down}


def standard_experts(module: nn.Module) -> Experts:
    """Our standard (unfactorized) `Experts` holding a transformers experts module's weights."""
    with torch.no_grad():
        return latent_experts(hf_expert_weights(module), {})[0]  # no kind factorized: the weights as they are


def set_submodule(model: nn.Module, name: str, module: nn.Module):
    """Replace the submodule at dotted path `name` of `model` by `module`."""
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
        if isinstance(module, LatentMoEExperts):
            raise ValueError(f"{name} is a LatentMoE routed path: molae converts standard MoE experts only")
        weights = module.dense_weights() if isinstance(module, Experts) else hf_expert_weights(module)
        _, F_, D = weights["gate"].shape
        latent = resolve_latent_dims(latent_dim, projections, F_, D)
        experts, report = latent_experts(weights, latent, groups, rank_ratio, dtype=dtype)
        experts.impl = getattr(module, "impl", "fast")
        set_submodule(model, name, experts)
        rows += [dict(module=name, **r) for r in report]
    return rows


def use_standard_experts(model: nn.Module) -> int:
    """Replace, in place, every transformers experts submodule by our standard `Experts`
    (same weights, our fast path). Returns how many were replaced."""
    todo = [(n, m) for n, m in find_experts(model) if not isinstance(m, Experts)]
    for name, module in todo:
        set_submodule(model, name, standard_experts(module))
    return len(todo)


# ----------------------------------------------------------------------------- MoLAE model types

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def is_embedding(name: str) -> bool:
    """The token embedding or the output projection (excluded from non-embedding counts)."""
    return "embed_tokens." in name or name.startswith("lm_head.")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a parameter or module name (`model.layers.3.mlp...` -> 3)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def install_experts(model: nn.Module, layers: dict[str, LayerSpec]) -> int:
    """Replace the experts of each layer listed in `layers` (spec.MolaeSpec.layers) by an empty module of the
    same shapes (weights come from a checkpoint or training): a MoLAE `Experts` (latent {}: our standard
    experts; permuted: groups by similarity), or LatentMoE's routed path."""
    done = set()
    for name, module in find_experts(model):
        spec = layers.get(str(layer_index(name)))
        if spec is None or not is_hf_experts(module):
            continue
        E, F2, D = module.gate_up_proj.shape
        ref = module.gate_up_proj
        if spec.latent_moe is not None:
            experts = LatentMoEExperts(D, F2 // 2, E, spec.latent_moe)
        else:
            experts = Experts(D, F2 // 2, E, spec.latent, spec.groups, spec.permuted)
        experts = experts.to(device=ref.device, dtype=ref.dtype)
        set_submodule(model, name, experts)
        done.add(str(layer_index(name)))
    missing = set(layers) - done
    if missing:
        raise ValueError(f"config.molae lists layers {sorted(missing, key=int)} that have no MoE experts module")
    return len(done)


def _family_classes(base_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_config = CONFIG_MAPPING[base_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    config_cls = type(f"Molae{base_config.__name__}", (base_config,),
                      {"model_type": f"molae_{base_type}", "__module__": __name__,
                       "__doc__": f"{base_config.__name__} plus a `molae` section: which layers have MoLAE experts."})

    def __init__(self, config):
        base_model.__init__(self, config)
        install_experts(self, MolaeSpec.from_dict(config.molae).layers)

    model_cls = type(f"Molae{base_model.__name__}", (base_model,),
                     {"config_class": config_cls, "__init__": __init__, "__module__": __name__,
                      "__doc__": f"{base_model.__name__} with MoLAE experts in the layers config.molae lists."})
    return config_cls, model_cls


def register_family(base_type: str):
    """Register `molae_<base_type>` with transformers' Auto classes and conversion mappings."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)

    config_cls, model_cls = _family_classes(base_type)
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    register_checkpoint_conversion_mapping(config_cls.model_type, get_checkpoint_conversion_mapping(base_type) or [],
                                           overwrite=True)
    globals()[config_cls.__name__], globals()[model_cls.__name__] = config_cls, model_cls
    return config_cls, model_cls


def register_all():
    for base_type in SUPPORTED:
        register_family(base_type)


__all__ = ["is_hf_experts", "find_experts", "hf_expert_weights", "standard_experts", "to_molae",
           "use_standard_experts", "set_submodule", "SUPPORTED", "is_embedding", "layer_index", "install_experts", "register_family", "register_all"]
