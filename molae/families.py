"""The MoE families molae converts, loads and trains: one declarative entry each, in the spirit of
transformers' conversion_mapping.py and torchtitan's StateDictAdapter. Everything molae needs to know of a
family that its transformers classes do not tell at run time is here, so adding a family is one entry in
FAMILIES (plus its tiny model in tests/tiny.py, which the tests run through every command).

On disk, a family's routed experts come in one of two layouts (convert.ExpertGroup reads and writes both):
  per-expert   {experts}.{e}.{name}.weight, name from `expert_names` (the hub's layout, what
               save_pretrained writes by default): gate, up [m, n], down [n, m]
  fused        {experts}.gate_up_proj [E, 2m, n] (gate rows first) and {experts}.down_proj [E, n, m], the
               layout of transformers' experts modules (save_pretrained(save_original_format=False))
Non-expert tensors are renamed between disk and modules by transformers' own conversion mapping
(sequential.renamings); the router's rows are the tensors of the MoE block with one row per expert.

Fields:
  expert_names  per-expert tensor name on disk, by kind
  count_key     the config key of the routed-expert count (edited when pruning drops experts)
  router        the MoE block's router module, called router(hidden) -> (logits [T, E], top-k weights, top-k ids)
  balancing     "aux-loss": the family's Switch load-balancing loss (softmax routers); "bias": DeepSeek-V3's
                loss-free correction bias (sigmoid routers), updated from the routed counts
  preset        kwargs of the family's config for a training preset from shared shape arguments, or None
  shared_expert the MoE block's shared-expert submodule (a SwiGLU MLP), or None: where upcycling puts a copy
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

SWIGLU = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
FUSED = ("gate_up_proj", "down_proj")  # transformers' stacked experts: [E, 2m, n] (gate, then up), [E, n, m]


@dataclass(frozen=True)
class Family:
    model_type: str
    expert_names: dict
    count_key: str
    router: str = "gate"
    balancing: str = "aux-loss"
    preset: Callable[..., dict] | None = None
    shared_expert: str | None = None


def _qwen2_moe(hidden, layers, heads, experts, top_k, inter, shared, **kw):
    """n ~ m fine-grained routed experts plus a gated shared expert (Qwen1.5-MoE-A2.7B)."""
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                intermediate_size=4 * hidden, moe_intermediate_size=inter, shared_expert_intermediate_size=shared,
                num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=False, tie_word_embeddings=False, **kw)


def _mixtral(hidden, layers, heads, kv_heads, experts, top_k, inter, **kw):
    """Few large experts, no shared expert, grouped-query attention (Mixtral-8x7B)."""
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k,
                tie_word_embeddings=False, **kw)


def _deepseek_v3(hidden, layers, heads, experts, top_k, inter, shared, dense_inter, **kw):
    """MLA sized for a small model; sigmoid router with a correction bias; first layer dense (DeepSeek-V3)."""
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                intermediate_size=dense_inter, moe_intermediate_size=inter, n_routed_experts=experts,
                n_shared_experts=shared, num_experts_per_tok=top_k, first_k_dense_replace=1, n_group=1, topk_group=1,
                routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=hidden // 4,
                qk_rope_head_dim=32, qk_nope_head_dim=hidden // heads - 32, v_head_dim=hidden // heads,
                tie_word_embeddings=False, **kw)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2_moe", SWIGLU, "num_experts", preset=_qwen2_moe, shared_expert="shared_expert"),
    Family("qwen3_moe", SWIGLU, "num_experts"),
    Family("mixtral", MIXTRAL_NAMES, "num_local_experts", preset=_mixtral),
    Family("olmoe", SWIGLU, "num_experts"),
    Family("deepseek_v2", SWIGLU, "n_routed_experts", balancing="bias", shared_expert="shared_experts"),
    Family("deepseek_v3", SWIGLU, "n_routed_experts", balancing="bias", preset=_deepseek_v3,
           shared_expert="shared_experts"),
    Family("phimoe", MIXTRAL_NAMES, "num_local_experts", router="router"),
)}
SUPPORTED = tuple(FAMILIES)
KIND_OF_NAME = {name: kind for f in FAMILIES.values() for kind, name in f.expert_names.items()}


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} is not supported: supported families are {', '.join(SUPPORTED)}")
    return FAMILIES[model_type]


def fused_rows(kind: str, m: int) -> slice:
    """The rows of a fused gate_up_proj [E, 2m, n] that hold `kind` (gate first, then up)."""
    return slice(0, m) if kind == "gate" else slice(m, 2 * m)


def split_gate_up(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused layout's [.., 2m, n] as (gate [.., m, n], up [.., m, n]) views."""
    m = gate_up.shape[-2] // 2
    return gate_up[..., fused_rows("gate", m), :], gate_up[..., fused_rows("up", m), :]


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=-2)


__all__ = ["Family", "FAMILIES", "SUPPORTED", "KIND_OF_NAME", "FUSED", "family", "fused_rows", "split_gate_up",
           "fuse_gate_up"]
