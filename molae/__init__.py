"""molae: Mixture of Latent Experts (MoLAE) for PyTorch and Hugging Face transformers."""

from .factorize import convert_moe, factorize_experts, latent_experts, shared_latent
from .layers import KINDS, PRESETS, Experts, MoE, MoEConfig, MoLAE, MoLAEConfig, param_counts

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "PRESETS",
    "Experts",
    "MoE",
    "MoEConfig",
    "MoLAE",
    "MoLAEConfig",
    "param_counts",
    "shared_latent",
    "factorize_experts",
    "latent_experts",
    "convert_moe",
]

from .models import register_all as _register_all

_register_all()  # molae_<family> model types for AutoConfig / AutoModelForCausalLM
