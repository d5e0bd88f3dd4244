"""A training run's settings, typed and checked (`TrainConfig`), the named recipes (`PRESETS`), and how
--config, a JSON file and --set build one."""

from __future__ import annotations

import functools
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..families import FAMILIES, SUPPORTED


@dataclass
class TrainConfig:
    name: str = "custom"
    family: str = "qwen2_moe"  # a transformers MoE model_type (models.SUPPORTED)
    model: dict = field(default_factory=dict)  # the family's config kwargs; vocab_size comes from the data
    # None: standard MoE. {"latent_dim": int | {kind: int} | None, "groups": G or "routing" (G = the router's
    # n_group: MoLAE groups = DeepSeek-V3's routing groups), "projections": [...]}: MoLAE.
    # {"latent_moe_dim": l}: LatentMoE's routed path (give num_experts / top-k scaled in `model`).
    molae: dict | None = None
    # None: a fresh initialisation. {"from": a dense model (directory or hub id), "shuffle": bool, "reinit":
    # fraction}: start from that dense model of the same family (train/upcycle.py; --upcycle-from sets "from").
    upcycle: dict | None = None
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
    compile_mode: str = "default"  # torch.compile's mode for each layer; reduce-overhead: CUDA graphs (fewer launches)
    # what `compile` compiles: each decoder layer (one graph each), or the whole model (embedding to logits: fewer
    # Python steps and graph launches on the host, which bounds the small presets' steps; longer compilation)
    compile_scope: str = "layer"
    ep: int = 1  # expert parallelism: each MoE layer's experts split over this many processes (torchrun)
    log_every: int = 10
    eval_every: int = 250
    eval_tokens: int = 2**18
    ckpt_every: int = 250
    time_budget_s: float | None = None  # set `steps` from the step time measured during warmup
    export_at: list = field(default_factory=list)  # fractions of the run at which to export model-step{N}/ too
    profile_steps: int = 0  # > 0: torch.profiler over that many steps after the first ten -> OUT/profile.txt
    # cuDNN's attention (torch's first choice for SDPA on H100/H200): its bf16 backward returns sporadic NaN
    # gradients (pytorch/pytorch#196678, NVIDIA/cudnn-frontend#160 and #1072); off, SDPA takes flash or
    # memory-efficient attention. true: the old path, to measure one against the other.
    cudnn_attention: bool = False

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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
COMPILE_SCOPES = ("layer", "model")


def _check_ranges(c: TrainConfig):
    bad = [f"{k}={getattr(c, k)!r} (allowed >= 1)" for k in ("steps", "batch_size", "grad_accum", "log_every",
                                                             "eval_every", "eval_tokens", "ckpt_every", "ep")
           if getattr(c, k) < 1]
    bad += [f"seq_len={c.seq_len} (allowed >= 2)"] if c.seq_len < 2 else []
    bad += [f"{k}={getattr(c, k)!r} (allowed > 0)" for k in ("lr", "grad_clip", "init_std") if getattr(c, k) <= 0]
    bad += [f"{k}={getattr(c, k)!r} (allowed >= 0)" for k in ("warmup", "weight_decay", "aux_loss_coef",
                                                             "bias_update_speed", "profile_steps") if getattr(c, k) < 0]
    bad += [f"min_lr_ratio={c.min_lr_ratio} (allowed 0 to 1)"] if not 0 <= c.min_lr_ratio <= 1 else []
    bad += [f"betas={list(c.betas)} (allowed 0 <= beta < 1)"] if not all(0 <= b < 1 for b in c.betas) else []
    bad += [f"time_budget_s={c.time_budget_s} (allowed > 0, or null)"] if c.time_budget_s is not None \
        and c.time_budget_s <= 0 else []
    bad += [f"compile_mode={c.compile_mode!r} (allowed {', '.join(COMPILE_MODES)})"] if c.compile_mode not in \
        COMPILE_MODES else []
    bad += [f"compile_scope={c.compile_scope!r} (allowed {', '.join(COMPILE_SCOPES)})"] if c.compile_scope not in \
        COMPILE_SCOPES else []
    bad += [f"dtype={c.dtype!r} (allowed auto, bfloat16, float16, float32)"] if c.dtype not in (
        "auto", "bfloat16", "float16", "float32") else []
    bad += [f"export_at={c.export_at} (allowed fractions between 0 and 1)"] if not all(
        isinstance(f, (int, float)) and 0 < f < 1 for f in c.export_at) else []
    if bad:
        raise ValueError(f"{', '.join(bad)}: out of range; give values in the ranges shown")
    if c.family not in SUPPORTED:
        raise ValueError(f"family {c.family!r} is not supported: choose one of {', '.join(SUPPORTED)}")


MOLAE_KEYS = {"latent_dim": int | dict | None, "groups": int | str, "projections": list | str, "latent_moe_dim": int}
UPCYCLE_KEYS = {"from": str, "shuffle": bool, "reinit": float}


def _check_keys(name: str, section: dict, keys: dict):
    """A section of the config has only the known keys, each of its declared type."""
    unknown = set(section) - set(keys)
    if unknown:
        raise ValueError(f"{name} section has unknown keys {sorted(unknown)}: allowed {', '.join(keys)}")
    for key, value in section.items():
        _typed(f"{name}.{key}", keys[key], value)


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
        _check_keys("molae", c.molae, MOLAE_KEYS)
        if isinstance(c.molae.get("groups"), str) and c.molae["groups"] != "routing":
            raise ValueError(f"molae.groups={c.molae['groups']!r}: molae.groups takes a whole number or 'routing' "
                             "(G = the router's n_group)")
    if c.upcycle is not None:
        _check_keys("upcycle", c.upcycle, UPCYCLE_KEYS)
        if not 0 <= c.upcycle.get("reinit", 0.5) < 1:
            raise ValueError(f"upcycle.reinit={c.upcycle['reinit']} is out of range: give a fraction from 0 to below 1")
        if c.molae is not None:
            raise ValueError("upcycle starts a standard MoE from a dense model: drop the molae section "
                             "(convert the upcycled MoE afterwards)")


# ----------------------------------------------------------------------------- presets

_qwen2_moe, _mixtral, _deepseek_v3 = (FAMILIES[f].preset for f in ("qwen2_moe", "mixtral", "deepseek_v3"))
# The GPU presets' compilation: each decoder layer one CUDA graph (mode reduce-overhead), measured faster than
# mode default on the H200 at every preset it was timed at, side by side (results/profile/: ref-qwen2-moe 1.17x,
# ref-deepseek-v3 1.01x at 64fc599/51801bb, ref-mixtral 1.03x at 02e0904, the frontier presets 1.29-1.37x at
# 1f6f682); on a CPU it compiles without graphs.
_COMPILED = dict(compile=True, compile_mode="reduce-overhead")


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
                                 **_COMPILED),
    # 8 experts, top-2, no shared expert, m = 2.5 n (Mixtral-8x7B: m = 3.5 n), grouped-query attention.
    "ref-mixtral": TrainConfig(name="ref-mixtral", family="mixtral",
                               model=_mixtral(512, 6, 8, 4, 8, 2, 1280), seq_len=1024, batch_size=32,
                               steps=4000, lr=2e-3, warmup=100, log_every=25, eval_every=500, ckpt_every=500,
                               **_COMPILED),
    # n >> m: 48 small experts (m = n/4), top-6, sigmoid router + correction bias, one shared expert,
    # first layer dense, multi-head latent attention (DeepSeek-V3: n = 3.5 m, 256 experts, top-8).
    "ref-deepseek-v3": TrainConfig(name="ref-deepseek-v3", family="deepseek_v3",
                                   model=_deepseek_v3(640, 7, 10, 48, 6, 160, 1, 1728), seq_len=1024, batch_size=32,
                                   steps=4000, lr=1.5e-3, warmup=100, log_every=25, eval_every=500, ckpt_every=500,
                                   **_COMPILED),
    # [10] an upcycled reference, as Qwen1.5-MoE-A2.7B was made from Qwen-1.8B (train/upcycle.py): a dense
    # Qwen2-MoE-family model (every layer's FFN dense, F = 1536) trained first, then `ref-qwen2-upcycled
    # --upcycle-from RUN/model`: 24 routed experts of F/4 (6 shuffled copies of 4 partitions), top-4 as Qwen1.5's,
    # a shared expert holding one whole copy (Qwen1.5: 4 of its 64 fine-grained experts), half of each routed
    # expert's neurons re-initialised. Half the scratch reference's peak learning rate: it starts trained.
    "dense-qwen2": TrainConfig(name="dense-qwen2", family="qwen2_moe",
                               model={**_qwen2_moe(512, 6, 8, 24, 4, 384, 1536), "intermediate_size": 1536,
                                      "mlp_only_layers": list(range(6))}, seq_len=1024, batch_size=32, steps=4000,
                               lr=2e-3, warmup=100, log_every=25, eval_every=500, ckpt_every=500, **_COMPILED),
    "ref-qwen2-upcycled": TrainConfig(name="ref-qwen2-upcycled", family="qwen2_moe",
                                      model=_qwen2_moe(512, 6, 8, 24, 4, 384, 1536),
                                      upcycle=dict(shuffle=True, reinit=0.5), seq_len=1024, batch_size=32,
                                      steps=4000, lr=1e-3, warmup=100, log_every=25, eval_every=500, ckpt_every=500,
                                      **_COMPILED),
    # [11] the loss-against-parameters frontier (experiments.FRONTIER varies E and sets `molae`), small enough
    # for 11-69 tokens per non-embedding parameter at the default 2500 steps of 128 x 512 (164M tokens, 1.6 passes
    # over the 104M-token corpus): n = m (16 experts of 192 x 192, top-2: 7.7M non-embedding) and n = 4m
    # (DeepSeek-V3 has n = 3.5m: 32 experts of 64 x 256, top-4: 7.3M). 128 rows a step, not 64: these models
    # leave the GPU idle most of a 64-row step (results/profile/profile.md), so twice the rows cost little more.
    "frontier-nm": TrainConfig(name="frontier-nm", family="qwen2_moe", model=_qwen2_moe(192, 4, 4, 16, 2, 192, 0),
                               seq_len=512, batch_size=128, steps=2500, lr=2e-3, warmup=200, log_every=50,
                               eval_every=1000, ckpt_every=1000, **_COMPILED),
    "frontier-n4m": TrainConfig(name="frontier-n4m", family="qwen2_moe", model=_qwen2_moe(256, 4, 4, 32, 4, 64, 0),
                                seq_len=512, batch_size=128, steps=2500, lr=2e-3, warmup=200, log_every=50,
                                eval_every=1000, ckpt_every=1000, **_COMPILED),
    # [4]'s pretraining comparison's base (results/pretrain_same_tokens.md): n = m, 16 experts, top-2; variants set
    # `molae`.
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
    `model.key=value`, `molae.key=value` and `upcycle.key=value` set one entry of those sections; `molae=null`
    makes a standard MoE. Each pair is checked as it is applied, so an error names the pair."""
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
            if section not in ("model", "molae", "upcycle"):
                raise ValueError(f"--set {pair}: only model.*, molae.* and upcycle.* take a sub-key")
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
