"""`molae heal`: a short distillation of a converted model towards its original (MOLAE.md §4).

What trains is what the conversion stores; everything else, routers included, stays as converted:
- a MoLAE checkpoint (a `molae` section in its config): the latent factors (every `experts.{gate,up,down}_{A,B}`);
- a dense method's output (a `molae_compression` section: pruning, HC-SMoE, D²-MoE, MoBE): the routed experts'
  whole weights (`experts.gate_up_proj`, `experts.down_proj`), so that every method that leaves parameters to
  train gets the same healing budget. Experts that are bit-identical in the checkpoint (HC-SMoE writes every
  member of a cluster as the merged expert) are trained tied: each receives the sum of their gradients, so they
  stay one expert. Pruned and merged experts are what those methods store; D²-MoE and MoBE store factors that are
  written multiplied out, and healing those whole weights trains more parameters than they store (heal.json
  says how many): an upper bound on what healing in their own parameters could give them.
Loss: KL(teacher || student) of the next-token distributions, mean over tokens, on windows of a prepared data
directory's training split (`molae data prepare`). AdamW, linear warmup then cosine, gradient clipping; bf16
autocast on CUDA.

Before training, each latent direction is rescaled so that its A and B entries have the same RMS
(the products are unchanged): Adam moves every entry by about the learning rate, and whitened
factors can differ in scale by orders of magnitude, which made the unbalanced factors diverge. The
KL on held-out windows (other windows of the training split) is measured before and after; the
healed tensors replace the converted ones in the checkpoint only if it fell (written beside it and
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
from .convert import find_expert_groups
from .families import split_gate_up
from .layers import Experts, LatentMoEExperts
from .models import find_experts, is_hf_experts, layer_index
from .spec import MolaeSpec

FACTOR = re.compile(r"\.experts\.((?:gate|up|down)_(?:A|B))$")


LATENT, DENSE = "latent factors", "whole experts"  # what heal trains (the module docstring)


def latent_factors(model) -> dict[tuple[int, str], torch.nn.Parameter]:
    """{(layer, factor name): parameter} of a MoLAE model's latent factors."""
    return {(layer_index(n), m.group(1)): p for n, p in model.named_parameters() if (m := FACTOR.search(n))}


def whole_experts(model) -> dict[tuple[int, str], torch.nn.Parameter]:
    """{(layer, "gate_up_proj" | "down_proj"): parameter} of every transformers routed-experts module."""
    return {(layer_index(n + "."), k): getattr(m, k) for n, m in find_experts(model) if is_hf_experts(m)
            for k in ("gate_up_proj", "down_proj")}


def identical_experts(*stacks_E: torch.Tensor) -> list[list[int]]:
    """Groups (two or more) of experts whose rows in every stack [E, ...] are bit-identical."""
    reps: list[list[int]] = []
    for e in range(stacks_E[0].shape[0]):
        same = next((g for g in reps if all(torch.equal(t[g[0]], t[e]) for t in stacks_E)), None)
        if same is None:
            reps.append([e])
        else:
            same.append(e)
    return [g for g in reps if len(g) > 1]


def tie(params: dict[tuple[int, str], torch.nn.Parameter]) -> tuple[list, int]:
    """Hooks giving each group of identical experts of a layer the sum of their gradients (so that they stay
    identical under any optimizer that treats equal entries alike), and how many parameters that leaves to train."""
    hooks, free = [], 0
    for layer in sorted({layer for layer, _ in params}):
        gu, down = params[(layer, "gate_up_proj")], params[(layer, "down_proj")]
        groups = identical_experts(gu.detach(), down.detach())
        free += (gu[0].numel() + down[0].numel()) * (gu.shape[0] - sum(len(g) - 1 for g in groups))
        if not groups:
            continue
        index = [torch.tensor(g, device=gu.device) for g in groups]

        def summed(grad, index=index):
            grad = grad.clone()
            for i in index:
                grad[i] = grad[i].sum(0, keepdim=True).expand(len(i), *grad.shape[1:])
            return grad
        hooks += [gu.register_hook(summed), down.register_hook(summed)]
    return hooks, free


def what_heals(config: dict, where) -> str:
    """LATENT or DENSE by what wrote the checkpoint (the module docstring), or a one-line error."""
    if "molae" in config:
        try:
            MolaeSpec.from_dict(config["molae"], str(where))
        except ValueError as e:
            raise CheckpointError(f"{e}; heal takes the output of molae convert") from None
        return LATENT
    if "molae_compression" in config:
        return DENSE
    raise CheckpointError(f"{where} is not a MoLAE checkpoint nor a compressed one (its config.json has neither a "
                          "molae nor a molae_compression section): heal takes the output of molae convert")


def trainable(model, what: str) -> dict[tuple[int, str], torch.nn.Parameter]:
    """{key: parameter} of what heal trains in `model`."""
    params = latent_factors(model) if what == LATENT else whole_experts(model)
    if not params:
        raise CheckpointError(f"{type(model).__name__} has no {what} to heal: the checkpoint and its config disagree")
    return params


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
    config = json.loads((dst / "config.json").read_text())
    what = what_heals(config, dst)  # before loading anything
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
    factors = trainable(student, what)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in factors.values():
        p.requires_grad_(True)
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    if what == LATENT:
        balance_factors(student)
        hooks, free = [], sum(p.numel() for p in factors.values())
    else:
        hooks, free = tie(factors)
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
    for h in hooks:
        h.remove()
    with amp():
        kl_after = held_out_kl()
    applied = kl_after < kl_before
    stored = config.get("molae_compression", {}).get("routed_params_stored", free)
    summary = dict(trained=what, trained_params=free, stored_params=stored,
                   steps=steps, tokens=steps * seq_len * batch_size, lr=lr, seq_len=seq_len, batch_size=batch_size,
                   seconds=time.perf_counter() - t0, kl_first=log[0]["kl"], kl_last=log[-1]["kl"],
                   held_out_kl_before=kl_before, held_out_kl_after=kl_after, applied=applied, log=log,
                   teacher=str(teacher), data=str(data_dir))
    _write_back(dst, what, {k: (p.detach() if applied else start[k]) for k, p in factors.items()}, summary)
    return summary


def _by_key(ckpt: SourceCheckpoint, what: str, trained: dict) -> dict[str, torch.Tensor]:
    """{checkpoint key: tensor} of the trained tensors: latent factors by name; whole experts in each layer's
    source layout (per-expert or fused, convert.ExpertGroup)."""
    by_key = {}
    if what == LATENT:
        for k in ckpt.keys():
            if m := FACTOR.search(k):
                by_key[k] = trained.pop((layer_index(k), m.group(1)))
    else:
        for g in find_expert_groups(ckpt).values():
            if (g.layer, "down_proj") not in trained:
                continue
            gate, up = split_gate_up(trained.pop((g.layer, "gate_up_proj")))
            by_key.update(g.tensors(dict(gate=gate, up=up, down=trained.pop((g.layer, "down_proj")))))
    if trained:
        raise CheckpointError(f"{ckpt.path} lacks tensors for {sorted(trained)}: the checkpoint and its model disagree")
    return by_key


def _write_back(dst: Path, what: str, trained: dict, summary: dict):
    """The checkpoint at dst with its trained tensors replaced (same names, dtypes, shards' limit)."""
    ckpt = SourceCheckpoint(dst)
    by_key = _by_key(ckpt, what, trained)
    for k, t in by_key.items():
        if tuple(t.shape) != tuple(ckpt.shape(k)):
            raise CheckpointError(f"{dst}: {k} is {tuple(ckpt.shape(k))} on disk, {tuple(t.shape)} trained: the "
                                  "checkpoint and its model disagree")
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


__all__ = ["heal", "heal_layer", "identical_experts", "kl_loss", "latent_factors", "whole_experts"]
