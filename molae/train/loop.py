"""The training loop, validation, and what a run leaves in OUT (see molae/train/__init__.py)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checkpoint import deferred_interrupt, write_json_atomically
from ..command import Interrupted, error_record, progress_bar
from ..data import TokenData
from ..evaluate import efficiency, window_bytes, windows_nll
from ..families import FAMILIES
from .config import TrainConfig, config_from_dict
from .distributed import ExpertShards, Run, shard
from .log import Logger, read_log
from .metrics import (LoadMeter, locate_nonfinite, measured_peak_flops, nonfinite_summary, train_flops_per_token,
                      update_router_bias)
from .model import build_model, export_pretrained, use_causal_sdpa
from .optim import autocast_dtype, lr_at, make_optimizer
from .state import full_state, load_checkpoint, save_checkpoint
from .upcycle import check_configs, dense_run_summary, load_dense_state, upcycle


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


def train(cfg: TrainConfig, data, out, resume: bool = False, device: str | None = None,
          progress: bool = True) -> dict:
    """Train on `data` (a prepared directory, or a TokenData); returns the summary (also written to
    OUT/summary.json). See the module notes. An interruption keeps the last checkpoint (`Interrupted`
    says how to continue); before the first one, it removes what the run wrote."""
    out = Path(out)
    check_out(out, resume)
    data = data if isinstance(data, TokenData) else TokenData(data)
    run = Run(device)
    created = not out.exists()
    on_disk = {"step": None}  # the step of the checkpoint on disk, kept up to date by _train
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()  # a process-wide switch: restored when the run ends
    try:
        torch.backends.cuda.enable_cudnn_sdp(cfg.cudnn_attention)
        return _train(cfg, data, out, resume, run, progress, on_disk)
    except KeyboardInterrupt:
        if on_disk["step"] is not None:
            raise Interrupted(f"{out / 'checkpoint.pt'} holds step {on_disk['step']}: rerun the same command with "
                              f"--resume to continue, or delete {out}") from None
        if run.main:  # nothing worth keeping: leave the directory as it was
            if created:
                shutil.rmtree(out, ignore_errors=True)
            exports = [*out.glob("model-step*"), *out.glob(".model-step*")]  # --export-at's, whole or partial
            for p in [out / name for name in RUN_FILES] + exports if not created else ():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
        run.close()


def _train(cfg, data, out, resume, run, progress, on_disk):
    if resume:
        saved = config_from_dict(json.loads((out / "train_config.json").read_text()))
        if asdict(replace(cfg, steps=saved.steps)) != asdict(saved):
            raise ValueError(f"--resume with a config that differs from {out}/train_config.json: "
                             "resume with the same --config and overrides (only --steps may change)")
        cfg = replace(saved, steps=cfg.steps)  # a longer --steps extends the run
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.vocab_size)
    if model.config._attn_implementation == "sdpa":
        use_causal_sdpa(model)  # whole windows: is_causal=True even when compiled whole (flash attention)
    upcycled = _upcycle(model, cfg) if cfg.upcycle is not None and not resume else None  # before anything is written
    model = model.to(run.device)
    out.mkdir(parents=True, exist_ok=True)
    molae_spec = model.config.molae
    eff = efficiency(model)
    flops_per_token = train_flops_per_token(model.config, eff["flops_per_token"], cfg.seq_len)
    params = dict(total=eff["total_params"], non_embedding=eff["non_embedding_params"], active=eff["active_params"],
                  routed_experts=eff["routed_expert_params"])
    experts = _expert_parallel(model, cfg, run)
    meter = LoadMeter(model)
    amp_dtype = autocast_dtype(cfg, run.device)
    amp = (lambda: torch.autocast(run.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    if run.world > 1:
        shard(model, run, ignored=set(experts.local.values()) if experts else None)
    opt, sched = make_optimizer(model, cfg)
    start = 0
    if resume:
        ck = load_checkpoint(out / "checkpoint.pt", model, opt, sched, experts)
        start = on_disk["step"] = ck["step"]
    if run.main:
        write_json_atomically(out / "train_config.json", asdict(cfg))
    run.barrier()
    graphed = cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")  # layers as CUDA graphs
    if cfg.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        for module in [model] if cfg.compile_scope == "model" else model.model.layers:
            module.compile(mode=mode)
    peak = measured_peak_flops(run.device, amp_dtype or torch.float32)
    logger = Logger(out, run.main, start if resume else None)
    if run.main and not resume:
        logger.log(dict(step=0, event="start", params=params, flops_per_token=flops_per_token, peak_flops=peak,
                        world=run.world, device=str(run.device), data=data.manifest.get("file_list_sha256"),
                        tokenizer=data.manifest.get("tokenizer_sha256")))
        if upcycled is not None:
            logger.log(dict(step=0, event="upcycle", **upcycled))
    model.train()
    bar = progress_bar(total=cfg.steps, initial=start, desc=cfg.name, unit="step", disable=not (progress and run.main))
    window = _new_window()
    step_times = []
    skipped = bad_streak = 0
    step = start
    val = None
    prof = _Profile(cfg, start, out if run.main else None)
    while step < cfg.steps:
        prof.at(step)
        t_step = time.perf_counter()
        loss_sum = torch.zeros((), device=run.device)
        aux_sum = torch.zeros((), device=run.device)
        for micro in range(cfg.grad_accum):
            j = micro * run.world + run.rank
            x = data.batch(cfg.seed, step, j, cfg.batch_size, cfg.seq_len).to(run.device, non_blocking=True)
            if run.world > 1:
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            if graphed:  # a new iteration: the graphs may overwrite the previous micro-batch's outputs
                torch.compiler.cudagraph_mark_step_begin()
            loss, aux, total = _losses(model, x, cfg, amp)
            meter.settle()  # this forward's expert loads, out of the graphs' buffers before the next replay
            (total / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
            if aux is not None:
                aux_sum += aux.detach() / cfg.grad_accum
        if experts is not None:
            experts.reduce_grads()
        params_with_grad = [p for p in model.parameters() if p.grad is not None]
        grad_norm, gn = _grad_norm(params_with_grad, experts)
        if torch.isfinite(gn):
            _clip(params_with_grad, cfg.grad_clip, grad_norm, gn, experts)
            opt.step()
            bad_streak = 0
        else:  # skip the update (a NaN would reach every parameter through the clip factor); say where
            skipped, bad_streak = skipped + 1, bad_streak + 1
            if run.main:
                logger.log(dict(step=step + 1, event="nonfinite_grad", loss=float(loss_sum),
                                params=nonfinite_summary(model)), bar)
            if bad_streak > 25:
                raise FloatingPointError(f"{bad_streak} steps in a row with non-finite gradients at step {step + 1}: "
                                         "lower --lr or check the model config")
        sched.step()
        opt.zero_grad(set_to_none=True)
        counts = meter.take()
        if skipped == 1 and bad_streak == 1 and run.world == 1 and experts is None:  # the run's first: where?
            logger.log(dict(step=step + 1, event="nonfinite_origin", **_locate(model, data, cfg, step, amp)), bar)
            opt.zero_grad(set_to_none=True)
            meter.discard()  # the re-run's routing is not this step's load
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
            meter.discard()  # the evaluation's routing is not the next step's load (it had been added to it)
        if step in _export_steps(cfg):  # a model part-way, to follow what conversion loses as the experts train
            msd, _ = full_state(model, opt, experts)
            if run.main:
                _publish(model, molae_spec, msd, data, out / f"model-step{step}")
                logger.log(dict(step=step, event="export", path=f"model-step{step}",
                                tokens=step * cfg.tokens_per_step * run.world), bar)
            run.barrier()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            with deferred_interrupt():  # a Ctrl-C between the rename and the record would misname the step
                save_checkpoint(out / "checkpoint.pt", model, opt, sched, step, cfg, run, experts)
                on_disk["step"] = step
            window["t0"] = time.perf_counter()  # checkpoint time is not training throughput
    prof.at(step)
    bar.close()
    if val is None:  # resumed a run that had already reached --steps
        val, bpb = validation_loss(model, data, cfg, run, amp, bits_per_byte=True)
        logger.log(dict(step=step, val_loss=val, val_bits_per_byte=bpb, tokens=step * cfg.tokens_per_step * run.world))
    return _finish(model, molae_spec, data, out, cfg, run, logger, params, flops_per_token, peak, val, opt, skipped,
                   experts)


def _publish(model, molae_spec, msd, data, dst: Path):
    """The model exported into dst (written beside it, then renamed onto it)."""
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    export_pretrained(model, molae_spec, msd, tmp, data.tokenizer())
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _export_steps(cfg: TrainConfig) -> set[int]:
    """The steps `export_at` (fractions of the run) names, for the run's final step count."""
    return {max(1, round(f * cfg.steps)) for f in cfg.export_at} - {cfg.steps}


def _upcycle(model, cfg: TrainConfig) -> dict:
    """`upcycle` in the config: the fresh MoE filled from the dense model (train/upcycle.py); what was done."""
    if not cfg.upcycle.get("from"):
        raise ValueError(f"--config {cfg.name} starts from a dense model: pass --upcycle-from DIR (a dense model of "
                         f"the {cfg.family} family, e.g. the model/ of a `molae train --config dense-qwen2` run)")
    state, dense_config = load_dense_state(cfg.upcycle["from"])
    check_configs(dense_config, model.config)
    info = upcycle(model, cfg.family, state, shuffle=cfg.upcycle.get("shuffle", True),
                   reinit=cfg.upcycle.get("reinit", 0.5), seed=cfg.seed)
    return dict(source=cfg.upcycle["from"], dense_run=dense_run_summary(cfg.upcycle["from"]), **info)


def _expert_parallel(model, cfg: TrainConfig, run: Run):
    """`--ep K`: the experts split over K processes (distributed.ExpertShards), or None."""
    if cfg.ep == 1:
        return None
    if run.world == 1:
        raise ValueError(f"--ep {cfg.ep} needs several processes: torchrun --nproc-per-node {cfg.ep} -m molae.train ...")
    if cfg.compile:
        raise ValueError("--ep with compile is not supported yet: drop --compile (or --set compile=false)")
    return ExpertShards(model, run, cfg.ep)


class _Profile:
    """`profile_steps`: torch.profiler (CPU and, where present, CUDA) over that many steps from ten steps into
    the run (compilation and warm-up done), or as many as remain; the kernel table, by device time, goes to
    OUT/profile.txt (what a GPU call can bring back) when they end. at(step) is called before each step."""

    def __init__(self, cfg, start: int, out):
        self.n, self.out, self.prof = cfg.profile_steps, out, None
        self.first = max(start, min(start + 10, cfg.steps - cfg.profile_steps))

    def at(self, step: int):
        if not self.n or self.out is None:
            return
        if step == self.first and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            cuda = torch.cuda.is_available()
            self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self.prof.start()
        elif self.prof is not None and step >= self.first + self.n:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.stop()
            keys = ["self_cuda_time_total"] if torch.cuda.is_available() else []
            averages = self.prof.key_averages()
            tables = [f"sorted by {key}\n" + averages.table(sort_by=key, row_limit=40, max_name_column_width=100)
                      for key in keys + ["self_cpu_time_total"]]  # the host's share too: what bounds small steps
            (self.out / "profile.txt").write_text(f"steps {self.first + 1}-{step} ({step - self.first} steps), "
                                                  + "\n\n".join(tables) + "\n")
            self.prof, self.n = None, 0


def next_token_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, computed in float32 whatever the logits' dtype."""
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten())


@functools.cache
def _compiled_loss():
    """With `compile`: one fused kernel each way reading the bf16 logits, in place of a float32 copy of them
    (B*T*V*4 bytes: 2.1 GB at the reference presets) and separate log-softmax kernels (8% of a ref-deepseek-v3
    step, H200). Made on first use: torch.compile imports dynamo, which importing the trainer should not."""
    return torch.compile(next_token_loss, dynamic=False)


def _losses(model, x, cfg: TrainConfig, amp) -> tuple:
    """One micro-batch x [B, T+1]: (next-token loss, the router's aux loss or None, what backward takes)."""
    with amp():
        outputs = model(input_ids=x[:, :-1])
        loss = (_compiled_loss() if cfg.compile else next_token_loss)(outputs.logits, x[:, 1:])
        aux = getattr(outputs, "aux_loss", None)
        return loss, aux, loss + cfg.aux_loss_coef * aux if aux is not None else loss


def _locate(model, data, cfg, step: int, amp) -> dict:
    """metrics.locate_nonfinite on this step's micro-batches, one at a time, until one reproduces the
    non-finite gradient (one process only: the re-run has no collectives). Never fatal: a failure is logged."""
    def one(j):
        def run():
            x = data.batch(cfg.seed, step, j, cfg.batch_size, cfg.seq_len).to(next(model.parameters()).device)
            loss, _, total = _losses(model, x, cfg, amp)
            total.backward()
            return loss.detach()
        return run

    info = {}
    try:
        for j in range(cfg.grad_accum):
            info = dict(locate_nonfinite(model, one(j)), micro_batch=j)
            if info["reproduced"]:
                break
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        info = dict(error=error_record(e))
    return info


def _grad_norm(params, experts) -> tuple:
    """(the norm as clip_grads_with_norm_ takes it, the same as a plain tensor). With expert parallelism: the
    FSDP2 parameters' norm and this rank's EP group's local experts' together."""
    local = {id(p) for p in experts.local.values()} if experts else set()
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in local])
    plain = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if experts is None:
        return norm, plain
    plain = (plain.square() + experts.squared_norm()).sqrt()
    return plain, plain


def _clip(params, max_norm: float, norm, plain, experts):
    if experts is None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return
    coef = min(1.0, max_norm / (plain.item() + 1e-6))  # DTensor and local gradients alike: a Python scalar
    for p in params:
        p.grad.mul_(coef)


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


def _finish(model, molae_spec, data, out, cfg, run, logger, params, flops_per_token, peak, val, opt, skipped,
            experts=None) -> dict:
    msd, _ = full_state(model, opt, experts)
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
                       peak_memory_gb=torch.cuda.max_memory_allocated(run.device) / 1e9 if run.device.type == "cuda"
                       else None, torch=torch.__version__)
        up = next((r for r in records if r.get("event") == "upcycle"), None)  # in the log: survives --resume
        if up is not None:
            summary["upcycle"] = {k: v for k, v in up.items() if k not in ("step", "event", "time")}
        _publish(model, molae_spec, msd, data, out / "model")
        write_json_atomically(out / "summary.json", summary)
    logger.close()
    run.barrier()
    return summary
