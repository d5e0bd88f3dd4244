"""Checkpoints: model, optimizer, scheduler, step and RNG, written atomically, gathered from FSDP2."""

from __future__ import annotations

import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .distributed import Run


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


def full_state(model, opt, experts=None):
    """(model state, optimizer state), whole tensors on the CPU, keyed by parameter name; an expert-parallel
    run's experts (distributed.ExpertShards) gathered from their ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if experts is not None:
        experts.gather(msd, osd, opt)
    return msd, osd


def save_checkpoint(path: Path, model, opt, sched, step: int, cfg: TrainConfig, run: Run, experts=None):
    """Every process gathers; process 0 writes beside `path` and renames onto it (never half-written)."""
    msd, osd = full_state(model, opt, experts)
    if run.main:
        part = path.with_name(path.name + ".partial")
        torch.save(dict(model=msd, optimizer=osd, scheduler=sched.state_dict(), step=step, config=asdict(cfg),
                        rng=rng_state()), part)
        os.replace(part, path)
    run.barrier()


def load_checkpoint(path: Path, model, opt, sched, experts=None) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    ck = torch.load(path, map_location="cpu", weights_only=False)
    if experts is not None:  # whole experts on disk: this rank keeps its share
        experts.scatter(ck["model"], ck["optimizer"])
    set_model_state_dict(model, ck["model"], options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, opt, ck["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False))
    sched.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    return ck
