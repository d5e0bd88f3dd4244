"""Starting an MoE run from a trained dense model of the same family: upcycling (`molae train --upcycle-from`).

Shapes (legend): D hidden size, F the dense FFN's intermediate size, M an expert's (F = P * M: P fine-grained
partitions), E routed experts (E = C * P: C copies of the dense FFN), S the shared expert's intermediate size.

The recipe follows Qwen1.5-MoE-A2.7B's release (https://qwenlm.github.io/blog/qwen-moe/, "Initialization": the
MoE is upcycled from Qwen-1.8B; fine-grained experts are partitions of the dense FFN's intermediate neurons; the
copies are shuffled along the intermediate dimension and part of the parameters re-initialised, which the blog
says sped up convergence):
  - every non-FFN tensor (embeddings, attention, norms, head, and FFNs that stay dense) is copied as it is;
  - copy c of the dense FFN has its own random permutation of the F neurons (`shuffle`), cut into P contiguous
    slices of M neurons: routed expert e = c * P + p holds slice p of copy c, so one copy of each partition,
    summed, is the dense FFN;
  - the shared expert, where the family has one, holds the first S neurons of one more shuffled copy (S = F: a
    whole copy, as Qwen1.5-MoE's shared expert is one FFN's worth of fine-grained experts);
  - `reinit`: of each routed expert, that fraction of its M neurons is drawn afresh (gate and up rows, the down
    column), from a normal with the dense matrix's mean and standard deviation.
  - the router, the shared expert's gate and any correction bias keep their fresh initialisation.
Where we differ: the blog gives neither code nor how the re-initialised parameters are chosen or drawn; we
re-initialise whole neurons with the dense weights' statistics, as Drop-Upcycling does (Nakamura et al., ICLR
2025, arXiv 2502.19261, ratio r = 0.5 there), and Qwen pads Qwen-1.8B's FFN (5504) to 5632 = 4 x 1408 before
partitioning, where we require F = P * M exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..families import FAMILIES
from ..models import find_experts, layer_index

DENSE_FFN = "model.layers.{i}.mlp.{kind}_proj.weight"  # a dense decoder layer's SwiGLU FFN (Qwen2, Mistral, Llama...)


class DenseTensors(Mapping):
    """The dense model's tensors by the names transformers gives its modules' parameters, each read from the
    safetensors shards when asked for (float32, CPU): upcycling holds one dense tensor at a time beside the MoE
    (a layer's three FFN matrices while it is partitioned), not the whole dense model, so its memory does not
    grow with the depth. A tied head (no lm_head.weight on disk) reads the embedding; rotary caches that old
    checkpoints saved (`inv_freq`, which transformers skips on load) are left out."""

    def __init__(self, ckpt, tied: bool):
        self.ckpt, self.names = ckpt, {k for k in ckpt.keys() if not k.endswith(".inv_freq")}
        self.alias = {"lm_head.weight": "model.embed_tokens.weight"} if tied and "lm_head.weight" not in self.names \
            and "model.embed_tokens.weight" in self.names else {}

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self.alias.get(name, name)
        if key not in self.names:
            raise KeyError(name)
        return self.ckpt.read([key])[key].float()

    def __contains__(self, name) -> bool:  # (Mapping's own would read the tensor to find out)
        return name in self.names or name in self.alias

    def __iter__(self):
        return iter(sorted(self.names | set(self.alias)))

    def __len__(self) -> int:
        return len(self.names) + len(self.alias)


def load_dense_state(path: str) -> tuple[DenseTensors, dict]:
    """The dense model's tensors (a lazy mapping, above) and its config as transformers reads it."""
    from transformers import AutoConfig

    from ..checkpoint import SourceCheckpoint, resolve

    src = Path(resolve(path))
    config = AutoConfig.from_pretrained(src).to_dict()
    return DenseTensors(SourceCheckpoint(src), bool(config.get("tie_word_embeddings"))), config


SAME_COMPUTATION = ("rope_parameters", "rms_norm_eps", "hidden_act", "head_dim", "sliding_window")


def check_configs(dense: dict, moe) -> None:
    """The copied layers compute what they were trained to only under the same positional encoding, norm epsilon
    and activation: a one-line error naming the first setting that differs and the --set that aligns it."""
    for key in SAME_COMPUTATION:
        a, b = dense.get(key), getattr(moe, key, None)
        if a is not None and b is not None and a != b or key == "sliding_window" and a != b:
            raise ValueError(f"the dense model's {key} is {json.dumps(a)}, the MoE config's {json.dumps(b)}: "
                             f"pass --set 'model.{key}={json.dumps(a)}' so that the copied layers compute the same")


def dense_ffn_keys(i: int) -> list[str]:
    return [DENSE_FFN.format(i=i, kind=k) for k in ("gate", "up", "down")]


def dense_ffn(state: dict, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [F, D], up [F, D], down [D, F]) of decoder layer i of the dense model."""
    keys = dense_ffn_keys(i)
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"the dense model has no {missing[0]}: --upcycle-from takes a dense model whose decoder "
                         "layers have a SwiGLU FFN (mlp.gate_proj, up_proj, down_proj)")
    gate_FD, up_FD, down_DF = (state[k] for k in keys)
    assert gate_FD.shape == up_FD.shape == down_DF.T.shape, (gate_FD.shape, up_FD.shape, down_DF.shape)
    return gate_FD, up_FD, down_DF


def partition_ffn(gate_FD, up_FD, down_DF, n_experts: int, inter: int, shared: int, shuffle: bool, reinit: float,
                  g: torch.Generator) -> dict[str, torch.Tensor]:
    """Routed experts {gate, up [E, M, D], down [E, D, M]} and the shared expert {shared_gate, shared_up [S, D],
    shared_down [D, S]} (S > 0) cut from one dense FFN by the recipe in the module notes."""
    F_, D = gate_FD.shape
    if F_ % inter:
        raise ValueError(f"the dense FFN has {F_} intermediate neurons, not a multiple of the experts' {inter}: "
                         f"choose moe_intermediate_size dividing {F_} (fine-grained partitions of the dense FFN)")
    P = F_ // inter
    if n_experts % P:
        raise ValueError(f"{n_experts} routed experts are not whole copies of the dense FFN's {P} partitions: "
                         f"choose a multiple of {P} experts")
    if shared > F_:
        raise ValueError(f"the shared expert's {shared} neurons exceed the dense FFN's {F_}: choose at most {F_}")
    perm = lambda: torch.randperm(F_, generator=g) if shuffle else torch.arange(F_)  # noqa: E731
    order_EM = torch.cat([perm() for _ in range(n_experts // P)]).view(n_experts, inter)  # neuron ids per expert
    out = dict(gate=gate_FD[order_EM].clone(), up=up_FD[order_EM].clone(), down=down_DF[:, order_EM].permute(1, 0, 2)
               .clone())  # [E, M, D], [E, M, D], [E, D, M]
    if reinit > 0:
        n_new = round(reinit * inter)
        stats = [(kind, w.std(), w.mean(), dim) for kind, w, dim in (("gate", gate_FD, 0), ("up", up_FD, 0),
                                                                      ("down", down_DF, 1))]
        for e in range(n_experts):
            rows = torch.randperm(inter, generator=g)[:n_new]
            for kind, std, mean, dim in stats:
                t = out[kind][e]
                fresh = torch.randn(t.shape, generator=g, dtype=t.dtype) * std + mean
                if dim == 0:
                    t[rows] = fresh[rows]
                else:
                    t[:, rows] = fresh[:, rows]
    if shared:
        keep = perm()[:shared]
        out.update(shared_gate=gate_FD[keep].clone(), shared_up=up_FD[keep].clone(),
                   shared_down=down_DF[:, keep].clone())
    return out


@torch.no_grad()
def upcycle(model, family: str, dense_state: dict, shuffle: bool = True, reinit: float = 0.5, seed: int = 0) -> dict:
    """Fill `model` (a freshly built MoE of `family`, our experts modules) from a dense model's tensors, in place.
    Returns how many tensors were copied and built from the FFNs, and which kept their initialisation."""
    g = torch.Generator().manual_seed(seed)
    shared_name = FAMILIES[family].shared_expert
    params = model.state_dict()  # parameters and persistent buffers, sharing the module's storage
    filled, consumed = {}, set()  # the MoE's tensors built from FFNs; the dense FFN tensors they came from
    for name, experts in find_experts(model):
        i = layer_index(name)
        mlp = name.rpartition(".")[0]
        shared = getattr(model.get_submodule(mlp), shared_name, None) if shared_name else None
        S = shared.gate_proj.out_features if shared is not None else 0
        parts = partition_ffn(*dense_ffn(dense_state, i), experts.n_experts, experts.inter, S, shuffle, reinit, g)
        consumed.update(dense_ffn_keys(i))
        for kind in ("gate", "up", "down"):
            filled[f"{name}.{kind}_proj"] = parts[kind]
            if S:
                filled[f"{mlp}.{shared_name}.{kind}_proj.weight"] = parts[f"shared_{kind}"]
    copied, fresh = [], []
    for name, t in params.items():
        src = filled[name] if name in filled else dense_state.get(name)  # (a dense tensor is read here, once)
        if src is None:
            if t.numel():  # (a zero-width shared expert is no tensor to speak of)
                fresh.append(name)
            continue
        if tuple(src.shape) != tuple(t.shape):
            raise ValueError(f"{name}: the dense model's tensor is {list(src.shape)}, the MoE's {list(t.shape)}: "
                             "--upcycle-from takes a dense model with the MoE config's attention, embedding and "
                             "vocabulary sizes (the same tokenizer)")
        t.copy_(src.to(t.dtype))
        if name not in filled:
            copied.append(name)
    unused = sorted(k for k in dense_state if k not in params and k not in consumed)
    if unused:
        raise ValueError(f"the dense model's {unused[0]} has no place in the MoE ({len(unused)} such tensors): "
                         "--upcycle-from takes a dense model of the MoE's family and depth")
    return dict(copied=len(copied), from_ffn=len(filled), initialised=sorted(fresh), shuffle=shuffle, reinit=reinit)


def dense_run_summary(path: str) -> dict | None:
    """The dense run's summary.json (tokens it trained on), when --upcycle-from is a `molae train` run's model/."""
    p = Path(path).parent / "summary.json"
    if not p.is_file():
        return None
    s = json.loads(p.read_text())
    return dict(name=s["config"]["name"], tokens=s["tokens"], final_val_loss=s["final_val_loss"],
                params=s["params"])


__all__ = ["upcycle", "partition_ffn", "load_dense_state", "DenseTensors", "check_configs", "dense_ffn",
           "dense_ffn_keys", "dense_run_summary"]
