"""Against transformers (litgpt's test_against_hf style): build tiny MoE models of several
families from their configs, swap their `experts` submodules, and compare logits."""

import copy

import pytest
import torch

from molae.models import find_experts, hf_expert_weights, to_molae, use_standard_experts
from molae.layers import Experts
from tiny import FAMILIES, tiny_model

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
