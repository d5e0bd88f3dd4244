"""Against transformers (litgpt's test_against_hf style): build tiny MoE models of several
families from their configs, swap their `experts` submodules, and compare logits."""

import copy

import pytest
import torch
import transformers

from molae.convert import find_experts, hf_expert_weights, to_molae, use_standard_experts
from molae.layers import Experts

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, experts_implementation="eager")
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
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                         n_shared_experts=1, first_k_dense_replace=1, num_key_value_heads=4, n_group=2, topk_group=1, q_lora_rank=None,
                         kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=3)),
}


def tiny_model(family, seed=0):
    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).double().eval()
    with torch.no_grad():  # HF initialises some MoE weights to zero; give every weight real values
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_standard_experts_reproduce_hf(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, 12))
    ref = logits(model, ids)
    ours = copy.deepcopy(model)
    assert use_standard_experts(ours) == len(find_experts(model)) > 0
    assert all(isinstance(m, Experts) for _, m in find_experts(ours))
    torch.testing.assert_close(logits(ours, ids), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_latent_molae_reproduces_hf_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, 12))
    ref = logits(model, ids)
    E, F_, D = hf_expert_weights(find_experts(model)[0][1])["gate"].shape
    groups = 2
    d = min(E // groups * F_, D)  # full latent size: lossless
    converted = copy.deepcopy(model)
    report = to_molae(converted, latent_dim=d, groups=groups, projections=("up", "gate", "down"))
    assert {r["module"] for r in report} == {n for n, _ in find_experts(model)}
    assert max(r["rel_error"] for r in report) < 1e-12
    torch.testing.assert_close(logits(converted, ids), ref)
    # the non-expert weights are untouched
    sd, sd_ref = converted.state_dict(), model.state_dict()
    for k, v in sd_ref.items():
        if ".experts." not in k:
            assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_smaller_latent_changes_logits_and_saves_parameters(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, 12))
    before = sum(p.numel() for p in model.parameters())
    converted = copy.deepcopy(model)
    report = to_molae(converted, latent_dim=8)
    after = sum(p.numel() for p in converted.parameters())
    assert after - before == sum(r["params_after"] - r["params_before"] for r in report) < 0
    out = logits(converted, ids)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, logits(model, ids), atol=1e-6)
    gen = converted.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (2, 9)
