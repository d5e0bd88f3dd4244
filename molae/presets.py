"""Real models' shapes: the one table. Each entry holds the shape-setting fields of the model's published
config.json; the MoE layer presets (`layers.PRESETS`, what `molae bench layer` times and `param_counts`
counts), the synthetic checkpoints of `molae bench convert` and their whole-model extrapolations all derive
from it. A leaf module: plain data and two functions.

(Training recipes, `molae train --config NAME`, are not model shapes: they live in molae/train/config.py.)
"""

from __future__ import annotations

REAL_MODELS: dict[str, dict] = {
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                              num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                              num_experts_per_tok=4, norm_topk_prob=False, qkv_bias=True, tie_word_embeddings=False,
                              max_position_embeddings=8192),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          tie_word_embeddings=False, max_position_embeddings=40960),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2, tie_word_embeddings=False, max_position_embeddings=32768),
    "deepseek-v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
                        n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_hidden_layers=61,
                        first_k_dense_replace=3, tie_word_embeddings=False),
}


def moe_layer(name: str) -> dict:
    """The MoE layer of a real model as `layers.MoEConfig` fields (each family's router conventions)."""
    c = REAL_MODELS[name]
    t = c["model_type"]
    if t == "qwen2_moe":
        return dict(dim=c["hidden_size"], inter=c["moe_intermediate_size"], n_experts=c["num_experts"],
                    top_k=c["num_experts_per_tok"], norm_topk_prob=c["norm_topk_prob"],
                    shared_inter=c["shared_expert_intermediate_size"], shared_gate=True)
    if t == "qwen3_moe":
        return dict(dim=c["hidden_size"], inter=c["moe_intermediate_size"], n_experts=c["num_experts"],
                    top_k=c["num_experts_per_tok"], norm_topk_prob=c["norm_topk_prob"])
    if t == "mixtral":  # softmax over the chosen two: the top-k renormalized
        return dict(dim=c["hidden_size"], inter=c["intermediate_size"], n_experts=c["num_local_experts"],
                    top_k=c["num_experts_per_tok"], norm_topk_prob=True)
    if t == "deepseek_v3":
        return dict(dim=c["hidden_size"], inter=c["moe_intermediate_size"], n_experts=c["n_routed_experts"],
                    top_k=c["num_experts_per_tok"], router="sigmoid", norm_topk_prob=c["norm_topk_prob"],
                    routed_scale=c["routed_scaling_factor"], n_group=c["n_group"], topk_group=c["topk_group"],
                    shared_inter=c["n_shared_experts"] * c["moe_intermediate_size"])
    raise ValueError(f"no layer mapping for {t}")


def moe_layer_count(name: str) -> int:
    c = REAL_MODELS[name]
    return c["num_hidden_layers"] - c.get("first_k_dense_replace", 0)


__all__ = ["REAL_MODELS", "moe_layer", "moe_layer_count"]
