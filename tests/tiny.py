"""Tiny random models of each supported MoE family, built from their transformers configs."""

import torch
import transformers

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, experts_implementation="eager")
MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
           num_key_value_heads=4)
FAMILIES = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       num_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                       head_dim=8, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                         n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, **MLA)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                         n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                         num_hidden_layers=3, **MLA)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)),
}


def tiny_model(family, seed=0, dtype=torch.float64, **overrides):
    """A tiny model with every weight drawn at random (HF zero-initialises some MoE weights)."""
    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    return model


def explain_last_layer(model, device: str = "cpu", tokens: int = 16):
    """torch._dynamo.explain of the model's last decoder layer (an MoE layer in every family) as the trainer's
    `compile` runs it: under bfloat16 autocast, on random hidden states of 2 x tokens."""
    x_BTD = torch.randn(2, tokens, model.config.hidden_size, device=device)
    pos_BT = torch.arange(tokens, device=device)[None].expand(2, -1)
    torch._dynamo.reset()
    with torch.autocast(device, dtype=torch.bfloat16):
        return torch._dynamo.explain(model.model.layers[-1])(
            x_BTD, position_embeddings=model.model.rotary_emb(x_BTD, pos_BT), attention_mask=None, position_ids=pos_BT)
