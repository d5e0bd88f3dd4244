"""`molae train`: pretrain transformers MoE models and their MoLAE / LatentMoE variants.

    molae train --config NAME|FILE --data DIR --out DIR [--resume] [--steps N ...] [--set key=value ...]
    torchrun --nproc-per-node K -m molae.train --config NAME --data DIR --out DIR     # FSDP2, K processes

A run is a `TrainConfig`: a transformers family and its config kwargs (`model`), an optional
`molae` section (what replaces each MoE layer's experts), and the optimisation settings. The
model is the family's own causal-LM class with its `experts` submodules swapped (models.py):
our standard `Experts` for a plain MoE run, MoLAE `Experts` or LatentMoE's routed path
otherwise; routers, shared experts and attention stay the family's code. So a model trained
here saves, converts, loads, evaluates and decompresses with the same code as a hub checkpoint.

Data: batches are a pure function of (seed, step, micro-batch index) (data.TokenData), so the
data position is the step. Global micro-batch j = micro * world + rank: one process with
grad_accum 2 sees the same tokens as two processes with grad_accum 1.

OUT holds: train_config.json, log.jsonl (one record per log step and per evaluation),
checkpoint.pt (model, optimizer, scheduler, step, RNG; replaced atomically every ckpt_every
steps), tb/ (TensorBoard, where installed), and at the end model/ (save_pretrained: the
family's own type for a standard MoE, `molae_<family>` otherwise, with the data's tokenizer)
and summary.json.
"""

from __future__ import annotations

from .cli import add_train_args, cmd_train, config_from_args, main
from .config import MOLAE_KEYS, PRESETS, TrainConfig, apply_overrides, config_from_dict, load_config
from .distributed import Run, shard
from .log import Logger, read_log
from .loop import check_out, train, validation_loss, validation_windows
from .metrics import LoadMeter, measured_peak_flops, nonfinite_grads, train_flops_per_token, update_router_bias
from .model import base_config, build_model, export_pretrained, is_standard, layer_spec, moe_layers
from .optim import autocast_dtype, lr_at, make_optimizer
from .state import full_state, load_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = ["TrainConfig", "PRESETS", "MOLAE_KEYS", "load_config", "config_from_dict", "apply_overrides", "Run",
           "shard", "Logger", "read_log", "check_out", "train", "validation_loss", "validation_windows", "LoadMeter",
           "measured_peak_flops", "nonfinite_grads", "train_flops_per_token", "update_router_bias", "base_config",
           "build_model", "export_pretrained", "is_standard", "layer_spec", "moe_layers", "autocast_dtype", "lr_at",
           "make_optimizer", "full_state", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state",
           "add_train_args", "cmd_train", "config_from_args", "main"]
