"""AdamW (no decay on norms and biases), warmup + cosine, the autocast dtype."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


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
                            fused=torch.cuda.is_available() and next(model.parameters()).is_cuda and cfg.ep == 1,
                            foreach=False if cfg.ep > 1 else None)  # EP: FSDP2's DTensors beside local tensors
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, cfg) / cfg.lr)
    return opt, sched


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype {cfg.dtype!r} is not known: allowed auto, bfloat16, float16, float32")
    return None if name == "float32" else getattr(torch, name)
