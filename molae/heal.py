"""`molae heal`: a short distillation of a converted model towards its original (MOLAE.md §4).

Only the latent factors (every `experts.{gate,up,down}_{A,B}`) train; everything else, routers
included, stays as converted. Loss: KL(teacher || student) of the next-token distributions, mean
over tokens, on windows of a prepared data directory's training split (`molae data prepare`).
AdamW, linear warmup then cosine, gradient clipping; bf16 autocast on CUDA.

Before training, each latent direction is rescaled so that its A and B entries have the same RMS
(the products are unchanged): Adam moves every entry by about the learning rate, and whitened
factors can differ in scale by orders of magnitude, which made the unbalanced factors diverge. The
KL on held-out windows (other windows of the training split) is measured before and after; the
healed factors replace the converted ones in the checkpoint only if it fell (written beside it and
renamed onto it; every other tensor, the config and the tokenizer kept). heal.json records it all.
"""

from __future__ import annotations

import json
import math
import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from .command import progress_bar

from .checkpoint import (CheckpointError, ShardWriter, SourceCheckpoint, copy_aux_files, parse_size, publish,
                         removed_on_error, resolve, temp_dir_for)
from .layers import Experts, LatentMoEExperts
from .models import layer_index
from .spec import MolaeSpec

FACTOR = re.compile(r"\.experts\.((?:gate|up|down)_(?:A|B))$")


def latent_factors(model) -> dict[tuple[int, str], torch.nn.Parameter]:
    """{(layer, factor name): parameter} of a MoLAE model's latent factors."""
    return {(layer_index(n), m.group(1)): p for n, p in model.named_parameters() if (m := FACTOR.search(n))}


@torch.no_grad()
def balance_factors(model) -> int:
    """Per group and latent direction, B *= s and A /= s with s = (ms(A) / ms(B))^(1/4) (ms: mean
    square of the entries), so both have the same RMS and every A_i B_g is unchanged. Returns how many
    factor pairs were rescaled."""
    n = 0
    for module in model.modules():
        if not isinstance(module, Experts) or isinstance(module, LatentMoEExperts):
            continue
        G, Eg = module.groups, module.n_experts // module.groups
        for kind, L in module.latent.items():
            A, B = getattr(module, f"{kind}_A"), getattr(module, f"{kind}_B")
            down = kind == "down"  # gate/up: A [E, F, L], B [G, L, D]; down: A [E, L, F], B [G, D, L]
            a_GL = A.double().square().mean(2 if down else 1).view(G, Eg, L).mean(1)
            b_GL = B.double().square().mean(1 if down else 2)
            s_GL = (a_GL.clamp_min(1e-30) / b_GL.clamp_min(1e-30)) ** 0.25
            s_EL = s_GL.repeat_interleave(Eg, 0)
            B.mul_((s_GL[:, None, :] if down else s_GL[:, :, None]).to(B.dtype))
            A.div_((s_EL[:, :, None] if down else s_EL[:, None, :]).to(A.dtype))
            n += 1
    return n


def heal_layer(experts, original, x_TD, idx_TK, w_TK, steps: int, lr: float = 1e-3, batch: int = 4096,
               held_out: float = 0.1, seed: int = 0) -> dict:
    """Layer-wise healing: train a converted experts module's latent factors (in place) to reproduce the
    original experts' outputs on the layer's captured calibration inputs, by Adam on the relative squared
    error ||y - y_orig||^2 / ||y_orig||^2 over batches of tokens. Factors are balanced first (as `heal`);
    the trained ones are kept only if the error on held-out tokens (the last `held_out` share) fell.
    One layer's inputs at a time: any model size."""
    T = x_TD.shape[0]
    n_val = max(1, int(held_out * T))
    val = slice(T - n_val, T)
    params = [p for n, p in experts.named_parameters() if n.endswith(("_A", "_B"))]
    with torch.no_grad():
        target = original(x_TD, idx_TK, w_TK).float()

    def error(sl, grad=False):
        with torch.set_grad_enabled(grad):
            y = experts(x_TD[sl], idx_TK[sl], w_TK[sl]).float()
            return (y - target[sl]).square().sum() / target[sl].square().sum().clamp_min(1e-30)

    balance_factors(experts)
    before = error(val).item()
    start = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = last = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = torch.randint(0, T - n_val, (min(batch, T - n_val),), generator=gen).to(x_TD.device)
        loss = error(pick, grad=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    for p in params:
        p.requires_grad_(False)
    after = error(val).item()
    kept = after < before
    if not kept:
        with torch.no_grad():
            for p, s0 in zip(params, start):
                p.copy_(s0)
    return dict(steps=steps, held_out_error_before=before, held_out_error_after=after, applied=kept,
                train_error_first=first, train_error_last=last)


def kl_loss(student_logits, teacher_logits, temperature: float = 1.0):
    """Mean over tokens of KL(teacher || student) at `temperature`, in nats (times T^2, as usual)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, -1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def heal(dst, teacher, data_dir, tokens: int, seq_len: int = 512, batch_size: int = 8, lr: float = 1e-4,
         warmup: int = 10, device: str = "cpu", seed: int = 0, progress: bool = True,
         held_out_batches: int = 4) -> dict:
    """Distil the MoLAE checkpoint at `dst` towards `teacher` on `tokens` training tokens of `data_dir`
    (a prepared directory in the model's vocabulary, or text tokenized with the model's tokenizer);
    rewrite `dst` (with the balanced factors, healed if that lowered the held-out KL)."""
    from .data import training_tokens
    from .evaluate import load

    dst = Path(resolve(dst))
    try:
        MolaeSpec.from_dict(json.loads((dst / "config.json").read_text()).get("molae"), str(dst))
    except ValueError as e:
        raise CheckpointError(f"{e}; heal takes the output of molae convert") from None
    if tokens < seq_len * batch_size:
        raise ValueError(f"--tokens {tokens} is less than one batch ({batch_size} x {seq_len}): raise --tokens")
    dev = torch.device(device)
    student, tokenizer = load(str(dst), device, "float32", need_tokenizer=False)
    teacher_model, teacher_tokenizer = load(str(teacher), device, "float32", need_tokenizer=False)
    if student.config.vocab_size != teacher_model.config.vocab_size:
        raise ValueError(f"--teacher has vocabulary {teacher_model.config.vocab_size}, {dst} has "
                         f"{student.config.vocab_size}: give the model {dst} was converted from")
    held_out_tokens = held_out_batches * batch_size * (seq_len + 1)
    data = training_tokens(data_dir, tokenizer or teacher_tokenizer, student.get_input_embeddings().num_embeddings,
                           max(tokens, held_out_tokens) + seq_len + 2)
    factors = latent_factors(student)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in factors.values():
        p.requires_grad_(True)
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    balance_factors(student)
    opt = torch.optim.AdamW(list(factors.values()), lr=lr, weight_decay=0.0)
    steps = tokens // (seq_len * batch_size)
    amp = (lambda: torch.autocast("cuda", torch.bfloat16)) if dev.type == "cuda" else nullcontext
    held_out = [data.batch(seed + 1, 0, j, batch_size, seq_len)[:, :seq_len] for j in range(held_out_batches)]

    @torch.no_grad()
    def held_out_kl():
        student.eval()
        kl = [kl_loss(student(input_ids=x.to(dev)).logits, teacher_model(input_ids=x.to(dev)).logits).item()
              for x in held_out]
        student.train()
        return sum(kl) / len(kl)

    with amp():
        kl_before = held_out_kl()
    start = {k: p.detach().clone() for k, p in factors.items()}
    log, t0 = [], time.perf_counter()
    student.train()
    for step in progress_bar(range(steps), desc="heal", unit="step", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = data.batch(seed, step, 0, batch_size, seq_len)[:, :seq_len].to(dev)
        with torch.no_grad(), amp():
            t_logits = teacher_model(input_ids=x).logits
        with amp():
            s_logits = student(input_ids=x).logits
        loss = kl_loss(s_logits, t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(factors.values()), 1.0)
        opt.step()
        log.append(dict(step=step, kl=loss.item()))
    with amp():
        kl_after = held_out_kl()
    applied = kl_after < kl_before
    summary = dict(steps=steps, tokens=steps * seq_len * batch_size, lr=lr, seq_len=seq_len, batch_size=batch_size,
                   seconds=time.perf_counter() - t0, kl_first=log[0]["kl"], kl_last=log[-1]["kl"],
                   held_out_kl_before=kl_before, held_out_kl_after=kl_after, applied=applied, log=log,
                   teacher=str(teacher), data=str(data_dir))
    _write_back(dst, {k: (p.detach() if applied else start[k]) for k, p in factors.items()}, summary)
    return summary


def _write_back(dst: Path, factors: dict, summary: dict):
    """The checkpoint at dst with its latent factors replaced (same names, dtypes, shards' limit)."""
    ckpt = SourceCheckpoint(dst)
    by_key = {}
    for k in ckpt.keys():
        if m := FACTOR.search(k):
            by_key[k] = factors.pop((layer_index(k), m.group(1)))
    if factors:
        raise CheckpointError(f"{dst} lacks tensors for {sorted(factors)}: the checkpoint and its model disagree")
    tmp = temp_dir_for(dst)
    writer = ShardWriter(tmp, dict(op="heal"), parse_size("2GB"))
    with removed_on_error(tmp, resumable=False):  # heal has no --resume: nothing partial is kept
        for i, k in enumerate(ckpt.keys()):
            t = ckpt.read([k])[k]
            writer.add(k, by_key[k].to(t.dtype) if k in by_key else t)
            writer.end_unit(str(i), None)
        writer.finish()
        copy_aux_files(dst, tmp)
        (tmp / "config.json").write_text((dst / "config.json").read_text())
        (tmp / "heal.json").write_text(json.dumps(summary, indent=2) + "\n")
        publish(tmp, dst, overwrite=True)


__all__ = ["heal", "heal_layer", "kl_loss", "latent_factors"]
