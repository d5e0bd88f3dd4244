"""The model a run trains: the family's causal LM with our experts modules, and its export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..families import FAMILIES, fuse_gate_up
from ..layers import LatentMoEExperts, check_projections, resolve_latent_dims
from ..models import find_experts, layer_index
from ..spec import LayerSpec, MolaeSpec
from .config import TrainConfig


def base_config(cfg: TrainConfig, vocab_size: int):
    """The family's own transformers config for the run."""
    from transformers import AutoConfig

    return AutoConfig.for_model(cfg.family, **{**cfg.model, "vocab_size": vocab_size})


def moe_layers(base) -> list[int]:
    """Indices of the decoder layers that have routed experts (a meta-device build: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base)
    return sorted({layer_index(n) for n, _ in find_experts(model)})


def layer_spec(cfg: TrainConfig, vocab_size: int) -> dict:
    """config.molae for the run: which layers get which experts module, and how they load back."""
    base = base_config(cfg, vocab_size)
    m = getattr(base, "moe_intermediate_size", None) or base.intermediate_size
    n = base.hidden_size
    spec = dict(cfg.molae or {})  # keys and types checked by TrainConfig
    if "latent_moe_dim" in spec:
        one = LayerSpec(latent_moe=int(spec["latent_moe_dim"]))
    elif spec:
        projections = check_projections(spec.get("projections", ("up", "gate")))
        one = LayerSpec(resolve_latent_dims(spec.get("latent_dim"), projections, m, n), _groups(spec, base))
    else:
        one = LayerSpec()  # our standard experts (fast path), exported in the family's layout
    layers = moe_layers(base)
    return MolaeSpec(cfg.family, {str(i): one for i in layers}, trained=dict(run=cfg.name),
                     source_layout={str(i): dict(layout="fused", names={}) for i in layers}).to_dict()


def _groups(spec: dict, base) -> int:
    """molae.groups: G, or "routing": the router's n_group (DeepSeek-V3's contiguous routing groups)."""
    g = spec.get("groups", 1)
    if g != "routing":
        return int(g)
    if (getattr(base, "n_group", None) or 1) == 1:
        raise ValueError(f"molae.groups=routing: the {base.model_type} config has no routing groups (n_group 1): "
                         "give molae.groups a number, or set model.n_group and model.topk_group")
    return base.n_group


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The family's causal LM with our experts modules, freshly initialised (seeded by cfg.seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    molae = layer_spec(cfg, vocab_size)
    # Token 0 is the end-of-text token (after each document). It is not the pad token: a pad id becomes the
    # embedding's padding_idx, whose row starts at zero and is never trained. A window that began with it then
    # carried an exactly zero residual row through every layer, and each RMSNorm multiplied that row's gradient
    # by 1/sqrt(eps) = 1000: ref-deepseek-v3's two norms in series per layer (input, kv_a) overflowed bf16 in
    # layer 0 (its non-finite steps, [11]). Training has no padding; --set model.pad_token_id=0 brings it back.
    kwargs = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None, **cfg.model, "vocab_size": vocab_size,
              "initializer_range": cfg.init_std, "molae": molae}
    aux = cfg.aux_loss_coef > 0 and FAMILIES[cfg.family].balancing == "aux-loss" and bool(molae["layers"])  # a
    # dense model (no MoE layers) has no router to balance
    kwargs.update(output_router_logits=aux, router_aux_loss_coef=cfg.aux_loss_coef)
    config = AutoConfig.for_model(f"molae_{cfg.family}", **kwargs)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = 0  # generate pads a batch with end-of-text (the embedding is not told)
    for _, m in find_experts(model):
        m.reset_parameters(cfg.init_std)
    return model


CAUSAL_SDPA = "molae_causal_sdpa"  # transformers' SDPA attention, never given a mask for whole training windows


def _causal_sdpa_mask(*, attention_mask=None, q_length: int, kv_length: int, q_offset=0, **kwargs):
    """The mask of CAUSAL_SDPA: none for a window without padding or cache (SDPA then runs with
    is_causal=True and may take flash attention), else transformers' own SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0:
        return None
    return sdpa_mask(attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     **kwargs)


def use_causal_sdpa(model) -> None:
    """Train with CAUSAL_SDPA. transformers skips the causal mask (is_causal=True instead) only outside
    torch.compile (5.17: masking_utils._ignore_causal_mask_sdpa returns False while dynamo traces), so a
    model compiled whole (compile_scope=model) got a materialised boolean mask, which sends SDPA to the
    memory-efficient kernel: 4x the attention time of flash on the H200 (results/profile/64fc599-qwen/).
    The same arithmetic as the mask; not saved (config._attn_implementation is not serialised)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(CAUSAL_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register(CAUSAL_SDPA, _causal_sdpa_mask)
    model.set_attn_implementation(CAUSAL_SDPA)


def is_standard(model) -> bool:
    return all(not m.latent and not isinstance(m, LatentMoEExperts) for _, m in find_experts(model))


def export_pretrained(model, config_molae: dict, state: dict, out: Path, tokenizer=None):
    """save_pretrained into out: a standard MoE as the family's own model type (experts fused as
    gate_up_proj [E, 2F, D] / down_proj [E, D, F], what `molae convert` takes); MoLAE or LatentMoE
    as `molae_<family>`. `state` is the full (gathered) state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_standard(model):
        base_cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("molae", "model_type")}
        base_cfg["architectures"] = [a.removeprefix("Molae") for a in base_cfg.get("architectures") or []]
        base_cfg.pop("transformers_version", None)
        config = AutoConfig.for_model(config_molae["base_model_type"], **base_cfg)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config)
        sd = {}
        for k, v in state.items():
            if k.endswith(".experts.gate_proj"):
                prefix = k[: -len("gate_proj")]
                sd[prefix + "gate_up_proj"] = fuse_gate_up(v, state[prefix + "up_proj"])
            elif not k.endswith(".experts.up_proj"):
                sd[k] = v
        hf.load_state_dict(sd, strict=True, assign=True)
        hf.config.output_router_logits = False
        hf.save_pretrained(out)
    else:
        model.config.output_router_logits = False
        # our tensor names as they are (the family's save would split a whole down_proj per expert)
        model.save_pretrained(out, state_dict=state, save_original_format=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- measuring
