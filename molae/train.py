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

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import sys
import time
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import write_json_atomically
from .command import (Interrupted, Parser, check_device, declare, positive_float, positive_int, progress_bar,
                      run_command)
from .data import TokenData
from .evaluate import efficiency, window_bytes, windows_nll
from .layers import Experts, LatentMoEExperts, check_projections, resolve_latent_dims
from .families import FAMILIES, SUPPORTED, fuse_gate_up
from .models import find_experts, layer_index
from .spec import LayerSpec, MolaeSpec


@dataclass
class TrainConfig:
    name: str = "custom"
    family: str = "qwen2_moe"  # a transformers MoE model_type (models.SUPPORTED)
    model: dict = field(default_factory=dict)  # the family's config kwargs; vocab_size comes from the data
    # None: standard MoE. {"latent_dim": int | {kind: int} | None, "groups": G, "projections": [...]}: MoLAE.
    # {"latent_moe_dim": l}: LatentMoE's routed path (give num_experts / top-k scaled in `model`).
    molae: dict | None = None
    seq_len: int = 512
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # softmax routers: Switch load-balancing loss (the family's own)
    bias_update_speed: float = 1e-3  # sigmoid routers with a correction bias (DeepSeek-V3): loss-free balancing
    init_std: float = 0.02
    seed: int = 0
    dtype: str = "auto"  # autocast dtype: auto = bfloat16 on CUDA, float32 (no autocast) on CPU
    compile: bool = False
    log_every: int = 10
    eval_every: int = 250
    eval_tokens: int = 2**18
    ckpt_every: int = 250
    time_budget_s: float | None = None  # set `steps` from the step time measured during warmup

    def __post_init__(self):
        """Every field of its declared type and in range, so that a JSON file, a --set or a flag with
        a bad value fails here, before anything is built or written."""
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, _field_types()[f.name], getattr(self, f.name)))
        _check_ranges(self)
        _check_sections(self)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum  # per process


@functools.cache
def _field_types() -> dict:
    return typing.get_type_hints(TrainConfig)


def _describe(hint) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin is tuple:
        return f"a list of {len(args)} " + ("numbers" if set(args) == {float} else "values")
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            dict: "a JSON object", list: "a JSON list"}.get(origin, str(hint))


def _typed(name: str, hint, value):
    """`value` as the type `hint` declares (an int where a float is declared becomes a float, a
    list where a tuple is declared a tuple), or a ValueError that says what the field takes."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin, args = typing.get_origin(option) or option, typing.get_args(option)
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
        if origin in (str, dict) and isinstance(value, origin):
            return value
        if origin is list and isinstance(value, (list, tuple)):
            return list(value)
        if origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_typed(f"{name}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    raise ValueError(f"{name}={value!r} is not {_describe(hint)}: {name} takes {_describe(hint)}")


def _check_ranges(c: TrainConfig):
    bad = [f"{k}={getattr(c, k)!r} (allowed >= 1)" for k in ("steps", "batch_size", "grad_accum", "log_every",
                                                             "eval_every", "eval_tokens", "ckpt_every")
           if getattr(c, k) < 1]
    bad += [f"seq_len={c.seq_len} (allowed >= 2)"] if c.seq_len < 2 else []
    bad += [f"{k}={getattr(c, k)!r} (allowed > 0)" for k in ("lr", "grad_clip", "init_std") if getattr(c, k) <= 0]
    bad += [f"{k}={getattr(c, k)!r} (allowed >= 0)" for k in ("warmup", "weight_decay", "aux_loss_coef",
                                                             "bias_update_speed") if getattr(c, k) < 0]
    bad += [f"min_lr_ratio={c.min_lr_ratio} (allowed 0 to 1)"] if not 0 <= c.min_lr_ratio <= 1 else []
    bad += [f"betas={list(c.betas)} (allowed 0 <= beta < 1)"] if not all(0 <= b < 1 for b in c.betas) else []
    bad += [f"time_budget_s={c.time_budget_s} (allowed > 0, or null)"] if c.time_budget_s is not None \
        and c.time_budget_s <= 0 else []
    bad += [f"dtype={c.dtype!r} (allowed auto, bfloat16, float16, float32)"] if c.dtype not in (
        "auto", "bfloat16", "float16", "float32") else []
    if bad:
        raise ValueError(f"{', '.join(bad)}: out of range; give values in the ranges shown")
    if c.family not in SUPPORTED:
        raise ValueError(f"family {c.family!r} is not supported: choose one of {', '.join(SUPPORTED)}")


MOLAE_KEYS = {"latent_dim": int | dict | None, "groups": int, "projections": list | str, "latent_moe_dim": int}


def _check_sections(c: TrainConfig):
    """The `model` section's values have the types of the family config's defaults; the `molae`
    section has only known keys of the right types."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    defaults = CONFIG_MAPPING[c.family]()
    for key, value in c.model.items():
        default = getattr(defaults, key, None)
        if value is not None and default is not None and not isinstance(default, (dict, list)):
            _typed(f"model.{key}", float if type(default) is float else type(default), value)
    if c.molae is not None:
        unknown = set(c.molae) - set(MOLAE_KEYS)
        if unknown:
            raise ValueError(f"molae section has unknown keys {sorted(unknown)}: allowed {', '.join(MOLAE_KEYS)}")
        for key, value in c.molae.items():
            _typed(f"molae.{key}", MOLAE_KEYS[key], value)


# ----------------------------------------------------------------------------- presets

_qwen2_moe, _mixtral, _deepseek_v3 = (FAMILIES[f].preset for f in ("qwen2_moe", "mixtral", "deepseek_v3"))


PRESETS: dict[str, TrainConfig] = {
    # `molae demo`: a tiny Qwen2-MoE on bytes, a few minutes on 2 CPU cores.
    "demo": TrainConfig(name="demo", family="qwen2_moe", model=_qwen2_moe(128, 4, 4, 16, 2, 64, 128),
                        seq_len=256, batch_size=16, steps=600, lr=3e-3, warmup=30, log_every=50, eval_every=600,
                        eval_tokens=96 * 256, ckpt_every=600),
    # Reference models ([4], results/reference_models.md), each about 7 minutes on an H100 (--time-budget 420).
    # n ~ m: fine-grained routed experts plus a shared expert (Qwen1.5-MoE-A2.7B: m/n = 0.69, 60 experts, top-4).
    "ref-qwen2-moe": TrainConfig(name="ref-qwen2-moe", family="qwen2_moe",
                                 model=_qwen2_moe(512, 6, 8, 24, 4, 384, 768), seq_len=1024, batch_size=32,
                                 steps=4000, lr=2e-3, warmup=100, log_every=25, eval_every=500, ckpt_every=500,
                                 compile=True),
    # 8 experts, top-2, no shared expert, m = 2.5 n (Mixtral-8x7B: m = 3.5 n), grouped-query attention.
    "ref-mixtral": TrainConfig(name="ref-mixtral", family="mixtral",
                               model=_mixtral(512, 6, 8, 4, 8, 2, 1280), seq_len=1024, batch_size=32,
                               steps=4000, lr=2e-3, warmup=100, log_every=25, eval_every=500, ckpt_every=500,
                               compile=True),
    # n >> m: 48 small experts (m = n/4), top-6, sigmoid router + correction bias, one shared expert,
    # first layer dense, multi-head latent attention (DeepSeek-V3: n = 3.5 m, 256 experts, top-8).
    "ref-deepseek-v3": TrainConfig(name="ref-deepseek-v3", family="deepseek_v3",
                                   model=_deepseek_v3(640, 7, 10, 48, 6, 160, 1, 1728), seq_len=1024, batch_size=32,
                                   steps=4000, lr=1.5e-3, warmup=100, log_every=25, eval_every=500, ckpt_every=500,
                                   compile=True),
    # The pretraining comparison's base (results/pretrain.md): n = m, 16 experts, top-2; variants set `molae`.
    "pretrain-moe": TrainConfig(name="pretrain-moe", family="qwen2_moe", model=_qwen2_moe(512, 6, 8, 16, 2, 512, 0),
                                seq_len=512, batch_size=64, steps=1500, lr=2e-3, warmup=100, log_every=25,
                                eval_every=500, ckpt_every=500),
}


def load_config(name_or_file: str) -> TrainConfig:
    if name_or_file in PRESETS:
        return replace(PRESETS[name_or_file])
    path = Path(name_or_file)
    if not path.is_file():
        raise ValueError(f"--config {name_or_file} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    return config_from_dict(json.loads(path.read_text()))


def config_from_dict(d: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}: allowed {sorted(known)}")
    return TrainConfig(**d)


def apply_overrides(cfg: TrainConfig, pairs: list[str]) -> TrainConfig:
    """`key=value` (a JSON value, or else a bare string), typed by the field it sets (TrainConfig's
    annotations; `model.key` by the family config's default, `molae.key` by MOLAE_KEYS);
    `model.key=value` and `molae.key=value` set one entry of those sections; `molae=null` makes a
    standard MoE. Each pair is checked as it is applied, so an error names the pair."""
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair}: expected KEY=VALUE, e.g. --set model.num_hidden_layers=4")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        d = asdict(cfg)
        section, _, sub = key.partition(".")
        if sub:
            if section not in ("model", "molae"):
                raise ValueError(f"--set {pair}: only model.* and molae.* take a sub-key")
            d[section] = dict(d[section] or {})
            d[section][sub] = value
        else:
            d[key] = value
        try:
            cfg = config_from_dict(d)
        except ValueError as e:
            raise ValueError(f"--set {pair}: {e}") from None
    return cfg


# ----------------------------------------------------------------------------- model


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
        one = LayerSpec(resolve_latent_dims(spec.get("latent_dim"), projections, m, n), int(spec.get("groups", 1)))
    else:
        one = LayerSpec()  # our standard experts (fast path), exported in the family's layout
    layers = moe_layers(base)
    return MolaeSpec(cfg.family, {str(i): one for i in layers}, trained=dict(run=cfg.name),
                     source_layout={str(i): dict(layout="fused", names={}) for i in layers}).to_dict()


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The family's causal LM with our experts modules, freshly initialised (seeded by cfg.seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    molae = layer_spec(cfg, vocab_size)
    kwargs = {**cfg.model, "vocab_size": vocab_size, "initializer_range": cfg.init_std, "molae": molae,
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    aux = cfg.aux_loss_coef > 0 and FAMILIES[cfg.family].balancing == "aux-loss"
    kwargs.update(output_router_logits=aux, router_aux_loss_coef=cfg.aux_loss_coef)
    config = AutoConfig.for_model(f"molae_{cfg.family}", **kwargs)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config)
    for _, m in find_experts(model):
        m.reset_parameters(cfg.init_std)
    return model


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


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the training dtype on this device (the MFU denominator): the
    fastest of six timed repeats (speed.matmul_rate), since a machine busy with other work during the
    measurement slows some repeats (a median then made MFU read above 100% on a shared CPU). On a CPU this
    is the rate of one float32 1024^3 matmul on the cores torch uses, not a datasheet peak."""
    from .speed import matmul_rate

    size = 8192 if device.type == "cuda" else 1024
    return matmul_rate(device, dtype, size, warmup=2, min_repeats=6, max_repeats=6)["fastest"]


def train_flops_per_token(config, forward_flops: int, seq_len: int) -> float:
    """PaLM-style: 3 x the forward's matmul FLOPs (evaluate.efficiency: active weights, routed experts
    by MOLAE.md §2's terms) + 12 * layers * heads * head_dim * seq_len for attention."""
    c = config
    head_dim = getattr(c, "v_head_dim", None) or getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * head_dim * seq_len
    return 3 * forward_flops + attn


class LoadMeter:
    """Counts routed slots per expert per MoE layer, on the device, from the experts' inputs."""

    def __init__(self, model):
        self.counts, self.handles = {}, []
        for name, m in find_experts(model):
            if isinstance(m, Experts):
                self.handles.append(m.register_forward_hook(self._hook(layer_index(name), m.n_experts)))

    def _hook(self, layer, E):
        def hook(module, args, output):
            idx = args[1].detach().reshape(-1)
            c = torch.bincount(idx, minlength=E)
            self.counts[layer] = self.counts[layer] + c if layer in self.counts else c
        return hook

    def take(self) -> dict[int, torch.Tensor]:
        counts, self.counts = self.counts, {}
        return counts

    @staticmethod
    def imbalance(counts: dict[int, torch.Tensor]) -> float | None:
        """Mean over layers of max expert load / mean expert load (1.0 = perfectly balanced)."""
        if not counts:
            return None
        r = [(c.max() / c.float().mean().clamp_min(1e-9)).item() for c in counts.values()]
        return float(np.mean(r))


def nonfinite_grads(model) -> list[str]:
    """Names of the parameters whose (local) gradient holds a NaN or an infinity."""
    out = []
    for n, p in model.named_parameters():
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if g is not None and not torch.isfinite(g).all():
            out.append(n)
    return out


def update_router_bias(model, counts: dict[int, torch.Tensor], speed: float):
    """DeepSeek-V3's auxiliary-loss-free balancing: b_e += speed * sign(mean load - load_e)."""
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias") and layer_index(name) in counts:
            load = counts[layer_index(name)].float()
            buf.add_(speed * torch.sign(load.mean() - load).to(buf.dtype))


# ----------------------------------------------------------------------------- the run


class Run:
    """Distributed context: rank, world, device; FSDP2 when world > 1."""

    def __init__(self, device: str | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        check_device(device)
        self.device = torch.device(f"cuda:{local}" if device == "cuda" else device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def shard(model, run: Run):
    """FSDP2: each decoder layer, then the root (embeddings, final norm, LM head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(run.device.type, (run.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to lr * min_lr_ratio at `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                            fused=torch.cuda.is_available() and next(model.parameters()).is_cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, cfg) / cfg.lr)
    return opt, sched


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype {cfg.dtype!r} is not known: allowed auto, bfloat16, float16, float32")
    return None if name == "float32" else getattr(torch, name)


def rng_state() -> dict:
    s = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def full_state(model, opt):
    """(model state, optimizer state), whole tensors on the CPU, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path: Path, model, opt, sched, step: int, cfg: TrainConfig, run: Run):
    """Every process gathers; process 0 writes beside `path` and renames onto it (never half-written)."""
    msd, osd = full_state(model, opt)
    if run.main:
        part = path.with_name(path.name + ".partial")
        torch.save(dict(model=msd, optimizer=osd, scheduler=sched.state_dict(), step=step, config=asdict(cfg),
                        rng=rng_state()), part)
        os.replace(part, path)
    run.barrier()


def load_checkpoint(path: Path, model, opt, sched) -> dict:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    ck = torch.load(path, map_location="cpu", weights_only=False)
    set_model_state_dict(model, ck["model"], options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, opt, ck["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False))
    sched.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    return ck


def read_log(path: Path) -> list[dict]:
    """The records of a run's log.jsonl (or any JSON-lines file), in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Logger:
    """Process 0 only: stdout (through tqdm), log.jsonl, and TensorBoard when it is installed."""

    def __init__(self, out: Path, main: bool, resume_step: int | None):
        self.main, self.path, self.tb = main, out / "log.jsonl", None
        if not main:
            return
        if resume_step is not None and self.path.exists():  # drop what the lost interval logged
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            part = self.path.with_name("log.jsonl.partial")
            part.write_text("".join(k + "\n" for k in keep))
            os.replace(part, self.path)
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step)
        except ImportError:
            self.tb = None

    def log(self, record: dict, bar=None):
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(k, v, record["step"])
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        (bar.write if bar is not None else print)(text)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def validation_windows(data: TokenData, cfg: TrainConfig, world: int) -> torch.Tensor:
    """The fixed validation windows, [W, seq_len + 1], W a multiple of batch_size * world (whole
    batches of the training shape on every process: no recompilation, collectives in step)."""
    windows = data.val_windows(cfg.seq_len, cfg.eval_tokens)
    per = cfg.batch_size * world
    return windows[: max(per, len(windows) // per * per)]


@torch.no_grad()
def validation_loss(model, data: TokenData, cfg: TrainConfig, run: Run, amp, bits_per_byte: bool = False):
    """Mean next-token cross-entropy (nats) over the fixed validation windows, split over processes.
    With bits_per_byte, also (summed NLL in bits) / (UTF-8 bytes of the scored tokens, decoded)."""
    model.eval()
    windows = validation_windows(data, cfg, run.world)
    total = windows_nll(model, windows[run.rank::run.world], cfg.batch_size, run.device, amp)
    run.all_reduce(total)
    model.train()
    loss = (total[0] / total[1]).item()
    if not bits_per_byte:
        return loss
    return loss, total[0].item() / math.log(2) / window_bytes(data.tokenizer(), windows)


def check_out(out: Path, resume: bool):
    ck = out / "checkpoint.pt"
    if resume and not ck.exists():
        raise FileNotFoundError(f"--resume: {out} has no checkpoint.pt: start the run without --resume")
    if not resume and (ck.exists() or (out / "model").exists()):
        raise FileExistsError(f"{out} holds a run: pass --resume to continue it or choose another --out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: pass a directory path")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} holds other files: choose a new or empty directory")


RUN_FILES = ("train_config.json", "log.jsonl", "tb", "checkpoint.pt.partial", ".model.partial")


def train(cfg: TrainConfig, data_dir, out, resume: bool = False, device: str | None = None,
          progress: bool = True) -> dict:
    """Train; returns the summary (also written to OUT/summary.json). See the module notes. An
    interruption keeps the last checkpoint (`Interrupted` says how to continue); before the first
    one, it removes what the run wrote."""
    out = Path(out)
    check_out(out, resume)
    data = TokenData(data_dir)
    run = Run(device)
    created = not out.exists()
    on_disk = {"step": None}  # the step of the checkpoint on disk, kept up to date by _train
    try:
        return _train(cfg, data, out, resume, run, progress, on_disk)
    except KeyboardInterrupt:
        if on_disk["step"] is not None:
            raise Interrupted(f"{out / 'checkpoint.pt'} holds step {on_disk['step']}: rerun the same command with "
                              f"--resume to continue, or delete {out}") from None
        if run.main:  # nothing worth keeping: leave the directory as it was
            if created:
                shutil.rmtree(out, ignore_errors=True)
            for name in RUN_FILES if not created else ():
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise
    finally:
        run.close()


def _train(cfg, data, out, resume, run, progress, on_disk):
    if resume:
        saved = config_from_dict(json.loads((out / "train_config.json").read_text()))
        if asdict(replace(cfg, steps=saved.steps)) != asdict(saved):
            raise ValueError(f"--resume with a config that differs from {out}/train_config.json: "
                             "resume with the same --config and overrides (only --steps may change)")
        cfg = replace(saved, steps=cfg.steps)  # a longer --steps extends the run
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.vocab_size).to(run.device)
    molae_spec = model.config.molae
    eff = efficiency(model)
    flops_per_token = train_flops_per_token(model.config, eff["flops_per_token"], cfg.seq_len)
    params = dict(total=eff["total_params"], non_embedding=eff["non_embedding_params"], active=eff["active_params"],
                  routed_experts=eff["routed_expert_params"])
    meter = LoadMeter(model)
    amp_dtype = autocast_dtype(cfg, run.device)
    amp = (lambda: torch.autocast(run.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    if run.world > 1:
        shard(model, run)
    opt, sched = make_optimizer(model, cfg)
    start = 0
    if resume:
        ck = load_checkpoint(out / "checkpoint.pt", model, opt, sched)
        start = on_disk["step"] = ck["step"]
    if run.main:
        write_json_atomically(out / "train_config.json", asdict(cfg))
    run.barrier()
    if cfg.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        for layer in model.model.layers:
            layer.compile()
    peak = measured_peak_flops(run.device, amp_dtype or torch.float32)
    logger = Logger(out, run.main, start if resume else None)
    if run.main and not resume:
        logger.log(dict(step=0, event="start", params=params, flops_per_token=flops_per_token, peak_flops=peak,
                        world=run.world, device=str(run.device), data=data.manifest.get("file_list_sha256"),
                        tokenizer=data.manifest.get("tokenizer_sha256")))
    model.train()
    bar = progress_bar(total=cfg.steps, initial=start, desc=cfg.name, unit="step", disable=not (progress and run.main))
    window = _new_window()
    step_times = []
    skipped = bad_streak = 0
    step = start
    val = None
    while step < cfg.steps:
        t_step = time.perf_counter()
        loss_sum = torch.zeros((), device=run.device)
        aux_sum = torch.zeros((), device=run.device)
        for micro in range(cfg.grad_accum):
            j = micro * run.world + run.rank
            x = data.batch(cfg.seed, step, j, cfg.batch_size, cfg.seq_len).to(run.device, non_blocking=True)
            if run.world > 1:
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with amp():
                outputs = model(input_ids=x[:, :-1])
                loss = F.cross_entropy(outputs.logits.flatten(0, 1).float(), x[:, 1:].flatten())
                aux = getattr(outputs, "aux_loss", None)
                total = loss + cfg.aux_loss_coef * aux if aux is not None else loss
            (total / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
            if aux is not None:
                aux_sum += aux.detach() / cfg.grad_accum
        params_with_grad = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params_with_grad])
        gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if torch.isfinite(gn):
            torch.nn.utils.clip_grads_with_norm_(params_with_grad, cfg.grad_clip, grad_norm)
            opt.step()
            bad_streak = 0
        else:  # skip the update (a NaN would reach every parameter through the clip factor); say where
            skipped, bad_streak = skipped + 1, bad_streak + 1
            if run.main:
                logger.log(dict(step=step + 1, event="nonfinite_grad", loss=float(loss_sum),
                                params=nonfinite_grads(model)[:8]), bar)
            if bad_streak > 25:
                raise FloatingPointError(f"{bad_streak} steps in a row with non-finite gradients at step {step + 1}: "
                                         "lower --lr or check the model config")
        sched.step()
        opt.zero_grad(set_to_none=True)
        counts = meter.take()
        if FAMILIES[cfg.family].balancing == "bias" and cfg.bias_update_speed > 0 and counts:
            for c in counts.values():
                run.all_reduce(c)
            update_router_bias(model, counts, cfg.bias_update_speed)
        step += 1
        window["steps"] += 1
        window["loss"] += loss_sum
        window["aux"] += aux_sum
        window["counts"].append(counts)
        bar.update(1)
        if cfg.time_budget_s and not resume and step <= min(cfg.warmup, 12):
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t_step)
            if step == min(cfg.warmup, 12):  # fix the schedule's length before the cosine starts
                t = torch.tensor(float(np.median(step_times[2:] or step_times)), device=run.device)
                run.all_reduce(t, dist.ReduceOp.MAX if run.world > 1 else None)
                cfg = replace(cfg, steps=max(cfg.warmup + 1, int(cfg.time_budget_s / t.item())))
                sched.lr_lambdas[0] = lambda s, c=cfg: lr_at(s, c) / c.lr
                bar.total = cfg.steps
                if run.main:
                    write_json_atomically(out / "train_config.json", asdict(cfg))
                    logger.log(dict(step=step, event="time_budget", step_seconds=t.item(), steps=cfg.steps), bar)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = _window_record(window, step, cfg, run, sched, gn, flops_per_token, peak)
            logger.log(rec, bar)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            window = _new_window()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if step == cfg.steps:
                val, bpb = validation_loss(model, data, cfg, run, amp, bits_per_byte=True)
                logger.log(dict(step=step, val_loss=val, val_bits_per_byte=bpb,
                                tokens=step * cfg.tokens_per_step * run.world), bar)
            else:
                val = validation_loss(model, data, cfg, run, amp)
                logger.log(dict(step=step, val_loss=val, tokens=step * cfg.tokens_per_step * run.world), bar)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(out / "checkpoint.pt", model, opt, sched, step, cfg, run)
            on_disk["step"] = step
            window["t0"] = time.perf_counter()  # checkpoint time is not training throughput
    bar.close()
    if val is None:  # resumed a run that had already reached --steps
        val, bpb = validation_loss(model, data, cfg, run, amp, bits_per_byte=True)
        logger.log(dict(step=step, val_loss=val, val_bits_per_byte=bpb, tokens=step * cfg.tokens_per_step * run.world))
    return _finish(model, molae_spec, data, out, cfg, run, logger, params, flops_per_token, peak, val, opt, skipped)


def _new_window() -> dict:
    """What the steps between two log records add up: time, step count, losses, routing counts."""
    return dict(t0=time.perf_counter(), steps=0, loss=0.0, aux=0.0, counts=[])


def _window_record(window, step, cfg, run, sched, grad_norm, flops_per_token, peak) -> dict:
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - window["t0"]
    stats = torch.stack([torch.as_tensor(window["loss"], device=run.device, dtype=torch.float32),
                         torch.as_tensor(window["aux"], device=run.device, dtype=torch.float32)])
    stats = run.all_reduce(stats) / run.world / window["steps"]
    tokens = window["steps"] * cfg.tokens_per_step * run.world
    counts = {}
    for c in window["counts"]:
        for layer, v in c.items():
            counts[layer] = counts[layer] + v if layer in counts else v
    for v in counts.values():  # every process's routing, not just this one's
        run.all_reduce(v)
    rec = dict(step=step, loss=stats[0].item(), lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
               tokens_per_s=tokens / seconds, mfu=tokens / seconds * flops_per_token / (peak * run.world),
               load_imbalance=LoadMeter.imbalance(counts), tokens=step * cfg.tokens_per_step * run.world)
    if cfg.aux_loss_coef > 0 and stats[1].item() > 0:
        rec["aux_loss"] = stats[1].item()
    return rec


def _finish(model, molae_spec, data, out, cfg, run, logger, params, flops_per_token, peak, val, opt, skipped) -> dict:
    msd, _ = full_state(model, opt)
    summary = None
    if run.main:
        records = read_log(out / "log.jsonl")
        train_recs = [r for r in records if "tokens_per_s" in r]
        steady = [r["tokens_per_s"] for r in train_recs[1:]] or [r["tokens_per_s"] for r in train_recs]
        mfus = [r["mfu"] for r in train_recs[1:]] or [r["mfu"] for r in train_recs]
        summary = dict(config=asdict(cfg), params=params, flops_per_token=flops_per_token,
                       train_flops=flops_per_token * cfg.steps * cfg.tokens_per_step * run.world,
                       tokens=cfg.steps * cfg.tokens_per_step * run.world, world=run.world, device=str(run.device),
                       device_name=torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
                       peak_flops=peak, final_val_loss=val, val_bits_per_byte=records[-1].get("val_bits_per_byte"),
                       val_tokens=int(validation_windows(data, cfg, run.world)[:, 1:].numel()),
                       final_train_loss=train_recs[-1]["loss"] if train_recs else None,
                       tokens_per_s=float(np.median(steady)) if steady else None, skipped_steps=skipped,
                       mfu=float(np.median(mfus)) if mfus else None,
                       data=dict(path=str(data.path), file_list_sha256=data.manifest.get("file_list_sha256"),
                                 tokenizer_sha256=data.manifest.get("tokenizer_sha256")),
                       torch=torch.__version__)
        tmp = out / ".model.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        export_pretrained(model, molae_spec, msd, tmp, data.tokenizer())
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        os.replace(tmp, out / "model")
        write_json_atomically(out / "summary.json", summary)
    logger.close()
    run.barrier()
    return summary


# ----------------------------------------------------------------------------- command line


def add_train_args(p: argparse.ArgumentParser):
    p.add_argument("--config", required=True, help=f"a preset ({', '.join(PRESETS)}) or a TrainConfig JSON file")
    p.add_argument("--data", required=True, type=Path, help="a directory made by `molae data prepare`")
    p.add_argument("--out", required=True, type=Path,
                   help="run directory (log, checkpoint, final model): new or empty, or a run to --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (a larger --steps extends it)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--steps", type=positive_int, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=positive_int, help="tokens per sequence")
    p.add_argument("--lr", type=positive_float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="seed of the initialisation and of the data order")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile each decoder layer")
    p.add_argument("--time-budget", type=positive_float, metavar="SECONDS",
                   help="set --steps from the step time measured in the first steps, to train about this long")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field, typed by the field: lr=1e-3, model.num_hidden_layers=4, "
                        "molae.groups=4, molae=null")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args) -> TrainConfig:
    cfg = apply_overrides(load_config(args.config), args.set)
    flags = dict(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
                 lr=args.lr, seed=args.seed, compile=args.compile, time_budget_s=args.time_budget)
    return replace(cfg, **{k: v for k, v in flags.items() if v is not None})


def cmd_train(args):
    cfg = config_from_args(args)
    summary = train(cfg, args.data, args.out, resume=args.resume, device=args.device, progress=not args.no_progress)
    if summary is not None:
        print(f"final validation loss {summary['final_val_loss']:.4f} after {summary['tokens']:,} tokens; "
              f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {100 * summary['mfu']:.1f}%; model saved to "
              f"{Path(args.out) / 'model'}")


def main(argv=None) -> int:
    p = Parser(prog="python -m molae.train", description="pretrain an MoE / MoLAE model (one process or torchrun)")
    add_train_args(p)
    declare(p, cmd_train, name="molae train", outputs={"out": "run-dir"}, devices=("device",))
    return run_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
