"""`molae convert` and `molae decompress`: Hugging Face MoE checkpoints to MoLAE and back, streaming.

On-disk expert layouts (S: the source's experts prefix, e.g. `model.layers.3.mlp.experts`):
  per_expert   S.{e}.gate_proj.weight [m, n], S.{e}.up_proj.weight, S.{e}.down_proj.weight [n, m]
               (Mixtral/PhiMoE name them w1 = gate, w3 = up, w2 = down); the hub's layout and
               what `save_pretrained` writes
  fused        S.gate_up_proj [E, 2m, n] (gate rows first), S.down_proj [E, n, m]; what
               `save_pretrained(save_original_format=False)` writes
A converted layer is written as the tensors of `molae.layers.Experts` under the same prefix:
S.{gate,up}_A [E, m, d], S.{gate,up}_B [G, d, n], S.down_A [E, d, m], S.down_B [G, n, d], and
S.{kind}_proj for kinds kept whole. Every other tensor is copied bit for bit under its own
name; transformers applies the family's own renames when the `molae_<family>` model loads.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import (CheckpointError, ShardWriter, SourceCheckpoint, check_destination, check_disk_space,
                         copy_aux_files, parse_size, publish, removed_on_error, resolve, temp_dir_for,
                         write_json_atomically)
from . import methods
from .budget import LATENT_ALIGN, latent_cost, routed_params
from .calibrate import LayerInputs, calibration_ids
from .command import check_device, progress_bar
from .factorize import allocate_latent, choose_groups
from .layers import KINDS, check_projections, multiply_out
from .families import FUSED, KIND_OF_NAME, SUPPORTED, family, fuse_gate_up, fused_rows
from .models import find_experts, is_embedding, layer_index, set_submodule
from .spec import LayerSpec, MolaeSpec

# the two on-disk layouts of the families' experts (molae/families.py)
PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<name>" + "|".join(KIND_OF_NAME) + r")\.weight$")
FUSED_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<name>" + "|".join(FUSED) + r")$")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ExpertGroup:
    """The routed experts of one layer as stored in the source checkpoint."""

    prefix: str
    layer: int
    layout: str  # "per_expert" or "fused"
    n_experts: int
    inter: int  # m
    dim: int  # n
    keys: list[str]
    names: dict[str, str]  # kind -> per-expert tensor name (gate_proj / w1, ...); empty when fused

    def read_kind(self, ckpt: SourceCheckpoint, kind: str, chunk: int = 16, device=None, out=None) -> torch.Tensor:
        """One projection kind of all experts, [E, m, n] (gate, up) or [E, n, m] (down), in the source
        dtype (fp8 dequantized to bfloat16) on `device` (default the CPU), or into `out`; read a few experts
        at a time so that little more than the result is held."""
        if self.layout == "fused":
            if kind == "down":
                t = ckpt.read_slice(f"{self.prefix}.down_proj", (slice(None),), device)
            else:
                t = ckpt.read_slice(f"{self.prefix}.gate_up_proj", (slice(None), fused_rows(kind, self.inter)), device)
            return t if out is None else out.copy_(t)
        keys = [f"{self.prefix}.{e}.{self.names[kind]}.weight" for e in range(self.n_experts)]
        for i in range(0, self.n_experts, chunk):
            part = ckpt.read(keys[i:i + chunk], device if out is None else out.device)
            for e in range(i, min(i + chunk, self.n_experts)):
                t = part.pop(keys[e])
                if out is None:
                    out = torch.empty((self.n_experts, *t.shape), dtype=t.dtype, device=t.device)
                out[e] = t
        return out

    def tensors(self, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{key: tensor} of whole expert weights ({gate, up: [E, m, n], down: [E, n, m]}) in this group's layout."""
        if self.layout == "fused":
            return {f"{self.prefix}.gate_up_proj": fuse_gate_up(dense["gate"], dense["up"]),
                    f"{self.prefix}.down_proj": dense["down"]}
        return {f"{self.prefix}.{e}.{self.names[kind]}.weight": dense[kind][e]
                for kind in KINDS for e in range(self.n_experts)}

    def write(self, writer: ShardWriter, dense: dict[str, torch.Tensor]):
        """Write whole expert weights back in this group's source layout."""
        for key, t in self.tensors(dense).items():
            writer.add(key, t)


def find_expert_groups(ckpt: SourceCheckpoint) -> dict[str, ExpertGroup]:
    """Group the source's expert tensors by experts prefix, checking each group is complete."""
    found: dict[str, dict] = {}
    for key in ckpt.keys():
        if m := PER_EXPERT.match(key):
            layout = "per_expert"
        elif m := FUSED_KEY.match(key):
            layout = "fused"
        else:
            continue
        g = found.setdefault(m["prefix"], dict(layout=layout, keys=[], names={}, experts=set()))
        if g["layout"] != layout:
            raise CheckpointError(f"{m['prefix']} mixes per-expert and fused tensors: the checkpoint is inconsistent")
        if layout == "per_expert":
            g["names"][KIND_OF_NAME[m["name"]]] = m["name"]
            g["experts"].add(int(m["e"]))
        g["keys"].append(key)
    groups = {}
    for prefix, g in found.items():
        layer = layer_index(prefix + ".")
        if layer is None:
            raise CheckpointError(f"experts at {prefix} are in no `layers.N` module: not a decoder MoE molae knows")
        if g["layout"] == "fused":
            gu, down = ckpt.shape(f"{prefix}.gate_up_proj"), ckpt.shape(f"{prefix}.down_proj")
            E, m, n = gu[0], gu[1] // 2, gu[2]
            if len(gu) != 3 or gu[1] % 2 or tuple(down) != (E, n, m):
                raise CheckpointError(f"{prefix}: gate_up_proj {gu} and down_proj {down} are not [E, 2m, n], [E, n, m]")
        else:
            E = len(g["experts"])
            if g["experts"] != set(range(E)) or len(g["keys"]) != 3 * E or set(g["names"]) != set(KINDS):
                raise CheckpointError(f"{prefix}: expected gate, up and down weights for experts 0..{E - 1}, "
                                      f"found {len(g['keys'])} tensors: the checkpoint is incomplete")
            m, n = ckpt.shape(f"{prefix}.0.{g['names']['gate']}.weight")
        groups[prefix] = ExpertGroup(prefix, layer, g["layout"], E, m, n, sorted(g["keys"]), g["names"])
    if len({g.layer for g in groups.values()}) != len(groups):
        raise CheckpointError("two experts modules in one decoder layer: not a layout molae converts")
    return groups


def copy_tensors(ckpt: SourceCheckpoint, keys: list[str], writer: ShardWriter, chunk: int = 64, rows=None):
    """Hand tensors to the writer exactly as stored, reading a few at a time; `rows` {key: indices}
    keeps only those rows of the tensors it names (a pruned router)."""
    rows = rows or {}
    for i in range(0, len(keys), chunk):
        for k, t in ckpt.read(keys[i:i + chunk]).items():
            writer.add(k, t[rows[k]].contiguous() if k in rows else t)


def parse_layers(spec: str | None, available: list[int]) -> list[int]:
    """'all' (or None), or a comma list of indices and ranges ('0-3,7,20-'), among `available`."""
    if spec is None or spec.strip() == "all":
        return sorted(available)
    chosen = set()
    try:
        for part in spec.split(","):
            lo, sep, hi = part.strip().partition("-")
            a = int(lo)
            b = (int(hi) if hi else max(available)) if sep else a
            chosen.update(range(a, b + 1))
    except ValueError:
        raise ValueError(f"--layers {spec!r} is not understood: write e.g. all, 0-3,7 or 12-") from None
    outside = sorted(chosen - set(available))
    if outside or not chosen:
        raise ValueError(f"--layers {spec!r} names layers without MoE experts ({outside}): the MoE layers are "
                         f"{_ranges(sorted(available))}")
    return sorted(chosen)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        start = x if start is None else start
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def _units(ckpt: SourceCheckpoint, groups: dict[str, ExpertGroup]) -> list[tuple[str, list[str], ExpertGroup | None]]:
    """(unit id, tensors copied as they are, experts group or None): one unit per layer, then the rest."""
    expert_keys = {k for g in groups.values() for k in g.keys}
    by_layer: dict[int, list[str]] = {}
    rest = []
    for k in ckpt.keys():
        if k in expert_keys:
            continue
        i = layer_index(k)
        (rest if i is None else by_layer.setdefault(i, [])).append(k)
    group_of = {g.layer: g for g in groups.values()}
    layers = sorted(set(by_layer) | set(group_of))
    return [(f"layer.{i}", by_layer.get(i, []), group_of.get(i)) for i in layers] + [("rest", rest, None)]


def check_not_molae(ckpt: SourceCheckpoint, command: str):
    """A MoLAE checkpoint has no whole experts to convert or analyze: say which file to use instead."""
    model_type = str(ckpt.config.get("model_type"))
    if "molae" in ckpt.config or model_type.startswith("molae_"):
        raise CheckpointError(f"{ckpt.path} is a MoLAE checkpoint already ({model_type}): {command} the MoE it "
                              "was converted from, or `molae decompress` it first and use that")


def _check_family(ckpt: SourceCheckpoint, groups) -> str:
    model_type = ckpt.config.get("model_type")
    if model_type in SUPPORTED:
        if not groups:
            raise CheckpointError(f"{ckpt.path} ({model_type}) has no MoE expert weights to convert")
        return model_type
    if groups or any("expert" in k for k in ckpt.keys()) or any("expert" in k for k in ckpt.config):
        raise CheckpointError(f"model type {model_type!r} is not supported: supported families are "
                              f"{', '.join(SUPPORTED)}")
    raise CheckpointError(f"{ckpt.path} is a dense {model_type} model with no MoE experts: "
                          f"molae converts MoE models ({', '.join(SUPPORTED)})")


@dataclass
class ConvertOptions:
    latent_dim: int | None = None  # None: m (capped at n)
    rank_ratio: float | None = None
    groups: int = 1
    projections: tuple[str, ...] = ("up", "gate")
    layers: str | None = None  # None/"all" or a spec like "0-3,7"
    dtype: str = "auto"
    device: str = "cpu"
    max_shard_size: str = "2GB"
    method: str = "molae"  # a name in molae.methods.METHODS
    budget: float | None = None  # fraction of the routed-expert parameters to keep
    calibration: str | None = None  # text file, directory or prepared data directory
    calib_tokens: int = 65536
    calib_seq_len: int = 512
    calib_seed: int = 0  # which windows of a prepared data directory (a second sample: another seed)
    calib_batch: int = 8  # calibration windows per forward pass of a layer
    carry: str = "original"  # what the next layer sees: the original layer's outputs (measured better without
    # layer-wise healing: results/pipeline_quality.md), or the converted layer's
    heal_steps: int = 0  # layer-wise healing: Adam steps per converted layer on its captured inputs (0: none)
    heal_lr: float = 1e-3
    group_by: str = "index"  # or "similarity", or "routing" (G = the router's n_group, its contiguous groups)
    group_choices: tuple | None = None  # with --budget: G per layer chosen among these (ints, or "E": one per expert)
    error_power: float = 1.0  # with --budget: each (layer, kind)'s error counts over its energy to this power
    # (1: relative error, every kind alike; 0: absolute whitened error; results/error_power/)
    damp: float = 0.01  # ridge on calibration Grams, relative to their mean diagonal
    mobe_steps: int = 30000  # MoBE's Adam steps (its authors' default)


def check_options(opts: ConvertOptions):
    """Every option checked alone and against the others, before any work."""
    if not check_projections(opts.projections):
        raise ValueError(f"--projections {','.join(opts.projections)!r} names no projection: allowed a comma list "
                         "of gate, up, down")
    method = methods.get(opts.method)
    if opts.rank_ratio is not None and not (0 < opts.rank_ratio <= 1):
        raise ValueError(f"--rank-ratio {opts.rank_ratio} is out of range: allowed 0 < rank_ratio <= 1")
    if opts.dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype {opts.dtype} is not known: allowed auto, {', '.join(DTYPES)}")
    if opts.budget is not None and not 0 < opts.budget < 1:
        raise ValueError(f"--budget {opts.budget} is out of range: allowed 0 < budget < 1 (a fraction of the "
                         "routed-expert parameters)")
    if opts.group_by not in ("index", "similarity", "routing"):
        raise ValueError(f"--group-by {opts.group_by} is not known: allowed index, similarity or routing")
    if opts.group_choices is not None and (opts.budget is None or opts.groups != 1 or opts.group_by == "routing"
                                           or not method.allocates):
        raise ValueError("--group-choices lets --budget choose G per layer: it needs --budget and the molae method, "
                         "without --groups or --group-by routing")
    if not 0 <= opts.error_power <= 1 or (opts.error_power != 1 and opts.budget is None):
        raise ValueError(f"--error-power {opts.error_power}: give a power from 0 to 1, with --budget (it weighs the "
                         "budget allocation's errors)")
    if opts.carry not in ("converted", "original"):
        raise ValueError(f"--calib-carry {opts.carry} is not known: allowed converted or original")
    calibrated = opts.calibration is not None
    if opts.rank_ratio is not None and calibrated:
        raise ValueError("--rank-ratio is the data-free method's step 1: leave it out with --calibration")
    if not method.latent and (opts.groups != 1 or opts.group_by != "index" or opts.rank_ratio is not None):
        raise ValueError(f"--groups, --group-by and --rank-ratio are MoLAE options: leave them out with "
                         f"--method {opts.method}")
    method.check(opts)
    if method.calibration == "required" and not calibrated:
        raise ValueError(f"--method {opts.method} needs --calibration FILE_OR_DIR (it scores experts on data)")
    if method.calibration == "none" and calibrated:
        raise ValueError(f"--method {opts.method} uses no calibration data: leave out --calibration")
    if opts.heal_steps and not (calibrated and method.latent):
        raise ValueError("--heal-steps trains latent factors on the layers' calibration inputs: it needs "
                         "--calibration and a MoLAE or svd --method")
    if opts.calib_tokens < 1 or opts.calib_seq_len < 2 or opts.calib_batch < 1:
        raise ValueError("--calib-tokens and --calib-batch must be >= 1 and --calib-seq-len >= 2")


def _plan(ckpt, groups, opts: ConvertOptions, method) -> dict[str, dict]:
    """{layer: spec} for the layers to convert, each method's plan from the shapes alone (MoLAE:
    {"latent": {kind: d}, "groups": G}; its --budget sizes come later, from the layers' spectra).
    Every argument checked against every layer before anything is written."""
    by_layer = {g.layer: g for g in groups.values()}
    plan = {}
    for i in parse_layers(opts.layers, sorted(by_layer)):
        g = by_layer[i]
        shape = methods.LayerShape(i, g.n_experts, g.inter, g.dim, ckpt.config.get("num_experts_per_tok", 1),
                                   ckpt.config.get("n_group") or 1)
        plan[str(i)] = dict(method.plan(shape, opts), layer=i)
    return plan


def _allocate(plan: dict, spectra: dict, by_layer: dict, opts: ConvertOptions):
    """--budget: latent sizes per layer and kind with the least summed (whitened) error, each (layer, kind)'s over
    its energy to the power --error-power (1: relative); kinds kept whole count against the budget in full.
    spectra: {(layer key, kind): {G: sigma2}}. Across the G choices of one (layer, kind) only the relative errors
    compare: each G's whitened energy differs (a group is whitened by its own experts' inputs, so G = E's energy
    is about top-k / E of G = 1's), and weighing each by its own energy to a power below 1 would favour the G
    with the least; so every G's error is relative to its own energy, times the smallest G's energy to 1 - power."""
    items, fixed, total = {}, 0, 0
    for key, spec in plan.items():
        g = by_layer[int(key)]
        dense = g.n_experts * g.inter * g.dim
        total += routed_params(g.n_experts, g.inter, g.dim)
        for kind in KINDS:
            if kind not in spec["latent"]:
                fixed += dense
                continue
            by_g = spectra[(key, kind)]  # {G: sigma2}
            ref = max(by_g[min(by_g)].sum().item(), 1e-300) ** (opts.error_power - 1)  # one per (layer, kind)
            items[(key, kind)] = {G: dict(sigma2=s2, energy=s2.sum().item(), dense=dense,
                                          scale=s2.sum().item() * ref,
                                          cost=latent_cost(g.n_experts, g.inter, g.dim, G)) for G, s2 in by_g.items()}
    choices = {key: spec.pop("group_choices") for key, spec in plan.items() if "group_choices" in spec}
    if choices:  # G per layer first (factorize.choose_groups), then d for the chosen G's
        curves = {key: {G: {kind: items[(key, kind)][G] for kind in plan[key]["latent"]} for G in Gs}
                  for key, Gs in choices.items()}
        for key, G in choose_groups(curves, int(opts.budget * total) - fixed).items():
            plan[key]["groups"] = G
    chosen = {(key, kind): by_g[plan[key]["groups"]] for (key, kind), by_g in items.items()}
    for (key, kind), d in allocate_latent(chosen, int(opts.budget * total) - fixed, LATENT_ALIGN).items():
        plan[key]["latent"][kind] = d


def _source_dtype(ckpt: SourceCheckpoint) -> torch.dtype:
    """The dtype the source's layers run in: that of its floating tensors (fp8 ones are read as bfloat16)."""
    for k in ckpt.keys():
        dt = ckpt.dtype(k)
        if dt.is_floating_point:
            return torch.bfloat16 if dt.itemsize == 1 else dt
    return torch.float32


def convert_checkpoint(src, dst, opts: ConvertOptions, report: Path | None = None, resume=False,
                       overwrite=False) -> dict:
    """Convert the MoE checkpoint at `src` (directory or hub id) into a MoLAE checkpoint at `dst` (or,
    with a baseline --method, a compressed checkpoint of the source's own family): one decoder layer at
    a time, with calibration on hidden states carried from layer to layer (module notes)."""
    dst = Path(dst)
    check_destination(dst, overwrite)
    check_options(opts)
    method = methods.get(opts.method)
    device = check_device(opts.device)
    ckpt = SourceCheckpoint(resolve(src))
    check_not_molae(ckpt, "convert")
    groups = find_expert_groups(ckpt)
    base_type = _check_family(ckpt, groups)
    ids = _calibration_windows(ckpt, opts) if opts.calibration is not None else None
    plan = _plan(ckpt, groups, opts, method)
    check_disk_space(dst, ckpt.disk_bytes() + 2**20)
    options = dict(asdict(opts), src=str(ckpt.path), projections=list(opts.projections),
                   group_choices=None if opts.group_choices is None else list(opts.group_choices))
    options.pop("device")  # a run may resume on another device
    writer = ShardWriter(temp_dir_for(dst), options, parse_size(opts.max_shard_size), resume=resume)
    with removed_on_error(writer.tmp):
        pipe = Pipeline(ckpt, groups, opts, method, device, writer, ids)
        if "plan" in writer.state:  # a resumed run: the plan its first pass settled
            plan = writer.state["plan"]
        elif method.allocates and opts.budget is not None:
            t0 = time.perf_counter()
            pipe.allocate(plan)
            writer.state["allocate_seconds"] = time.perf_counter() - t0
        writer.state["plan"] = plan
        pipe.convert(plan)
        return _finish(ckpt, groups, plan, opts, method, base_type, writer, dst, report, overwrite)


def _calibration_windows(ckpt: SourceCheckpoint, opts: ConvertOptions) -> torch.Tensor:
    from transformers import AutoTokenizer

    from .data import is_prepared

    tokenizer = None
    if not is_prepared(opts.calibration):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path))
        except (OSError, ValueError, KeyError):
            raise ValueError(f"{ckpt.path} has no tokenizer to read --calibration {opts.calibration} with: pass a "
                             "prepared data directory") from None
    vocab = ckpt.config.get("vocab_size")
    if opts.calib_seed and tokenizer is not None:
        raise ValueError(f"--calib-seed picks windows of a prepared data directory; --calibration {opts.calibration} "
                         "is text, read in order: drop --calib-seed or `molae data prepare` the text")
    return calibration_ids(opts.calibration, tokenizer, opts.calib_tokens, opts.calib_seq_len, opts.calib_seed,
                           model_vocab=vocab)


class KindLoader(Mapping):
    """One layer's expert weights, read from the shards onto the device one projection kind at a time
    (asking for another kind drops the last): a data-free layer never holds more than one kind's stack."""

    def __init__(self, ckpt, group: ExpertGroup, device):
        self.ckpt, self.group, self.device, self._kind, self._W = ckpt, group, device, None, None

    def __getitem__(self, kind: str) -> torch.Tensor:
        if kind not in KINDS:
            raise KeyError(kind)
        if kind != self._kind:
            self._W = None
            self._W, self._kind = self.group.read_kind(self.ckpt, kind, device=self.device), kind
        return self._W

    def __iter__(self):
        return iter(KINDS)

    def __len__(self):
        return len(KINDS)


class Pipeline:
    """The streaming loop every method goes through (module notes): per decoder layer, read it (and,
    with calibration, run it on the carried hidden states, capturing its experts' inputs), let the method
    convert its experts, write the layer, carry its outputs on, free it."""

    def __init__(self, ckpt, groups, opts: ConvertOptions, method, device, writer: ShardWriter, ids):
        self.ckpt, self.opts, self.method, self.device, self.writer, self.ids = ckpt, opts, method, device, writer, ids
        self.by_layer = {g.layer: g for g in groups.values()}
        self.units = _units(ckpt, groups)
        self.runner = None
        if ids is not None:
            from .sequential import LayerRunner

            self.runner = LayerRunner(ckpt, self.by_layer, device, _source_dtype(ckpt))

    # ---- reading
    def _weights(self, i: int, layer):
        """One layer's experts {kind: [E, m, n] / [E, n, m]} on the device: from the loaded layer, or read
        from the shards one kind at a time (`KindLoader`)."""
        if layer is not None:
            (_, ex), = find_experts(layer)
            return {kind: getattr(ex, f"{kind}_proj").detach() for kind in KINDS}
        return KindLoader(self.ckpt, self.by_layer[i], self.device)

    def _inputs(self, layer, i, hidden):
        """The layer's outputs on the carried hidden states, and its experts' captured inputs."""
        out, (x, idx, w, logits) = self.runner.run(layer, i, hidden, capture=True)
        return out, LayerInputs(x, idx, w, self.by_layer[i].n_experts, logits_TE=logits)

    # ---- first pass: spectra for --budget
    def allocate(self, plan: dict):
        spectra = {}
        hidden = self.runner.start(self.ids, self.opts.calib_batch) if self.runner else None
        for unit, _, group in progress_bar(self.units, desc="allocate", unit="layer"):
            i = None if group is None else group.layer
            if unit == "rest" or (i is None and self.runner is None):
                continue
            layer = self.runner.load(int(unit.split(".")[1])) if self.runner else None
            spec = plan.get(str(i)) if i is not None else None
            inputs = None
            if self.runner is not None and spec is not None:
                hidden, inputs = self._inputs(layer, i, hidden)
            elif self.runner is not None:
                hidden = self.runner.run(layer, int(unit.split(".")[1]), hidden)[0]
            if spec is not None:
                W = self._weights(i, layer)
                for G in spec.get("group_choices", [spec["groups"]]):
                    for kind, s2 in self.method.spectra(W, inputs, dict(spec, groups=G), self.opts).items():
                        spectra.setdefault((str(i), kind), {})[G] = s2
                del W
            del layer, inputs
        _allocate(plan, spectra, self.by_layer, self.opts)

    # ---- the converting pass
    def convert(self, plan: dict):
        w = self.writer
        self.hidden = None
        if self.runner is not None:
            self.hidden = self.runner.start(self.ids, self.opts.calib_batch)
            if w.state.get("carry"):  # resumed: the hidden states after the last finished layer
                self.hidden = [h.to(self.device) for h in torch.load(w.tmp / w.state["carry"], weights_only=True)]
            w.before_progress = self._save_carry
        for unit, copied, group in progress_bar(self.units, desc="convert", unit="layer"):
            if unit in w.done:
                continue
            t0 = time.perf_counter()
            if unit == "rest":
                copy_tensors(self.ckpt, copied, w)
                w.end_unit(unit, {})
                continue
            i = int(unit.split(".")[1])
            layer = self.runner.load(i) if self.runner else None
            spec = plan.get(str(i)) if group is not None else None
            info = {}
            if spec is None:
                copy_tensors(self.ckpt, copied + (group.keys if group is not None else []), w)
                if layer is not None:
                    self.hidden = self.runner.run(layer, i, self.hidden)[0]
            else:
                info = self._convert_layer(i, layer, group, copied, spec)
            del layer
            for r in info.get("rows", []):
                r["unit_seconds"] = time.perf_counter() - t0  # read, calibrate, convert, write
            w.end_unit(unit, info)

    def _convert_layer(self, i, layer, group, copied, spec) -> dict:
        inputs = None
        if layer is not None:
            orig_out, inputs = self._inputs(layer, i, self.hidden)
            unrouted = int((inputs.count == 0).sum())
            if unrouted:  # the stated fallback: such experts' statistics are the layer's mean (the prior)
                print(f"molae convert: layer {i}: {unrouted} of {inputs.E} experts got no calibration tokens; their "
                      "input statistics are the layer's mean (raise --calib-tokens for their own)", file=sys.stderr)
        W = self._weights(i, layer)
        try:
            out = self.method.convert(W, inputs, spec, self.opts)
        except ValueError as e:
            raise ValueError(f"layer {i} ({group.prefix}): {e}") from None
        if self.opts.heal_steps and inputs is not None and out.latent is not None:
            from .heal import heal_layer

            (_, original), = find_experts(layer)
            healed = heal_layer(out.module, original, inputs.x_TD, inputs.idx_TK, inputs.w_TK, self.opts.heal_steps,
                                self.opts.heal_lr)
            out.latent.update({n: t.detach() for n, t in out.module.named_parameters()})
            del original
            for r in out.rows:
                r["layer_heal"] = healed
        out_dtype = W["gate"].dtype if self.opts.dtype == "auto" else DTYPES[self.opts.dtype]
        if out.latent is not None:
            for name, t in out.latent.items():
                self.writer.add(f"{group.prefix}.{name}", t.to(out_dtype) if t.is_floating_point() else t)
        else:
            kept = out.dense["gate"].shape[0]
            ExpertGroup(group.prefix, group.layer, group.layout, kept, group.inter, group.dim, [], group.names).write(
                self.writer, {k: v.to(out_dtype).cpu().contiguous() for k, v in out.dense.items()})
        copy_tensors(self.ckpt, copied, self.writer,
                     rows=None if out.keep is None else _router_rows(self.ckpt, group, copied, out.keep))
        del W  # the original experts go with the layer's old module: not held while the converted layer runs
        if layer is not None:
            if self.opts.carry == "converted" and out.module is not None:
                (name, _), = find_experts(layer)
                set_submodule(layer, name, out.module)
                self.hidden = self.runner.run(layer, i, self.hidden)[0]
            else:
                self.hidden = orig_out
        return dict(rows=out.rows, record=out.record, keep=out.keep)

    def _save_carry(self) -> dict:
        """Called by the writer before it records finished layers: the hidden states the next layer
        takes, saved beside the shards (a new file each time; progress.json names the valid one)."""
        name = f"carry-{self.writer.flushes:05d}.pt"
        part = self.writer.tmp / (name + ".partial")
        torch.save([h.cpu() for h in self.hidden], part)
        os.replace(part, self.writer.tmp / name)
        return dict(carry=name)


def _router_rows(ckpt, group: ExpertGroup, keys: list[str], keep: list[int]) -> dict:
    """{key: kept rows} for the router tensors of a pruned layer: tensors of its MoE block (outside the
    experts and shared experts) with one row per expert (gate weight [E, n], correction bias [E])."""
    block = group.prefix.rsplit(".experts", 1)[0] + "."
    rows = {k: keep for k in keys if k.startswith(block) and "shared" not in k
            and ckpt.shape(k)[0] == group.n_experts}
    if not any(len(ckpt.shape(k)) == 2 for k in rows):
        raise CheckpointError(f"{block[:-1]}: no router weight [{group.n_experts}, n] found to prune")
    return rows


def _finish(ckpt, groups, plan, opts, method, base_type, writer, dst, report, overwrite) -> dict:
    """Shards renamed, the config (molae section or molae_compression), auxiliary files, the report; published."""
    weight_map = writer.finish()
    for f in writer.tmp.glob("carry-*.pt"):
        f.unlink()
    infos = {unit: writer.done.get(unit) or {} for unit, *_ in _units(ckpt, groups)}
    tmp = writer.tmp
    rows = [r for info in infos.values() for r in info.get("rows", [])]
    summary = _summary(ckpt, groups, plan, rows, weight_map, tmp)
    summary.update(method=opts.method, allocate_seconds=writer.state.get("allocate_seconds"))
    options = dict(method=opts.method, budget=opts.budget, latent_dim=opts.latent_dim, rank_ratio=opts.rank_ratio,
                   groups=opts.groups, group_by=opts.group_by, projections=list(check_projections(opts.projections)),
                   group_choices=None if opts.group_choices is None else list(opts.group_choices),
                   calibration=None if opts.calibration is None else str(opts.calibration),
                   calib_tokens=opts.calib_tokens if opts.calibration else None,
                   calib_seed=opts.calib_seed if opts.calibration else None,
                   carry=opts.carry if opts.calibration else None, heal_steps=opts.heal_steps or None)
    if method.latent:
        layers = {unit.split(".")[1]: LayerSpec.from_dict(info["record"], unit) for unit, info in infos.items()
                  if info.get("record")}
        molae = MolaeSpec(base_type, layers, options=options, source_layout={
            str(g.layer): dict(layout=g.layout, names=g.names) for g in groups.values()}).to_dict()
        config = dict(ckpt.config, model_type=f"molae_{base_type}", molae=molae,
                      architectures=[f"Molae{a}" for a in ckpt.config.get("architectures", [])])
    else:  # the source's own architecture; what the method stores, recorded
        config = dict(ckpt.config, molae_compression=dict(options, routed_params_stored=summary["after"]["expert_stored"],
                                                          routed_params_before=summary["before"]["expert"]))
        if method.prunes:
            config[family(base_type).count_key] = len(next(info["keep"] for info in infos.values() if info.get("keep")))
    config.pop("quantization_config", None)  # fp8 sources are written dequantized
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_aux_files(ckpt.path, tmp)
    if report is not None:
        write_json_atomically(Path(report), summary)
    publish(tmp, dst, overwrite)
    return summary


def _summary(ckpt, groups, plan, rows, weight_map, tmp: Path) -> dict:
    expert_keys = {k for g in groups.values() for k in g.keys}
    before = dict(total=0, expert=0, non_embedding=0)
    for k in ckpt.keys():
        n = ckpt.numel(k)
        before["total"] += n
        before["expert"] += n if k in expert_keys else 0
        before["non_embedding"] += 0 if is_embedding(k) else n
    after = dict(total=0, expert=0, non_embedding=0)
    prefixes = tuple(g.prefix + "." for g in groups.values())
    files = sorted(set(weight_map.values()))
    for file in files:
        with safe_open(tmp / file, framework="pt") as f:
            for k in f.keys():
                n = math.prod(f.get_slice(k).get_shape())
                after["total"] += n
                after["expert"] += n if k.startswith(prefixes) else 0
                after["non_embedding"] += 0 if is_embedding(k) else n
    before["bytes_on_disk"] = ckpt.disk_bytes()
    after["bytes_on_disk"] = sum((tmp / f).stat().st_size for f in files)
    # what the method stores: whole-matrix baselines write more than they would keep
    after["expert_stored"] = after["expert"] - sum(r["params_on_disk"] - r["params_after"] for r in rows
                                                   if "params_on_disk" in r)
    return dict(layers_converted=len(plan), layers=rows, before=before, after=after)


def format_summary(summary: dict) -> str:
    """A short table: per projection kind over the converted layers, then the totals."""
    aware = any("rel_output_error" in r for r in summary["layers"])
    lines = [f"converted {summary['layers_converted']} MoE layers" + (f" ({summary['method']})" if
             summary.get("method", "molae") != "molae" else ""), "",
             "| projection | latent d | rel. Frobenius error (mean / max) | energy kept (mean / min) |"
             + (" rel. output error on calibration inputs (mean / max) |" if aware else ""),
             "|---|---|---|---|" + ("---|" if aware else "")]
    for kind in KINDS:
        rs = [r for r in summary["layers"] if r["kind"] == kind and r["latent_dim"]]
        if rs:
            ds = sorted({r["latent_dim"] for r in rs})
            err = [r["rel_error"] for r in rs]
            en = [r["energy_kept"] for r in rs]
            out = [r["rel_output_error"] for r in rs if "rel_output_error" in r]
            lines.append(f"| {kind} | {','.join(map(str, ds))} | {sum(err) / len(err):.4f} / {max(err):.4f} | "
                         f"{sum(en) / len(en):.4f} / {min(en):.4f} |"
                         + (f" {sum(out) / len(out):.4f} / {max(out):.4f} |" if aware else ""))
    lines += ["", "| | before | after | change |", "|---|---:|---:|---:|"]
    b, a = summary["before"], summary["after"]
    rows = [("total parameters", b["total"], a["total"]), ("routed-expert parameters", b["expert"], a["expert"])]
    if a.get("expert_stored", a["expert"]) != a["expert"]:  # a whole-matrix baseline: what it would store
        rows.append((f"routed-expert parameters the {summary['method']} method stores", b["expert"], a["expert_stored"]))
    rows += [("non-embedding parameters", b["non_embedding"], a["non_embedding"]),
             ("bytes on disk", b["bytes_on_disk"], a["bytes_on_disk"])]
    for label, x, y in rows:
        lines.append(f"| {label} | {x:,} | {y:,} | {100 * (y - x) / max(x, 1):+.1f}% |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- decompress


def decompress_checkpoint(src, dst, dtype: str = "auto", device: str = "cpu", max_shard_size: str = "2GB",
                          resume=False, overwrite=False) -> dict:
    """Multiply a MoLAE checkpoint's factors out into a checkpoint of the original architecture,
    experts written in the layout the original had."""
    dst = Path(dst)
    check_destination(dst, overwrite)
    ckpt = SourceCheckpoint(resolve(src))
    try:
        molae = MolaeSpec.from_dict(ckpt.config.get("molae"), str(ckpt.path))
    except ValueError as e:
        raise CheckpointError(f"{e}; decompress takes the output of molae convert") from None
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype {dtype} is not known: allowed auto, {', '.join(DTYPES)}")
    device = check_device(device)
    check_disk_space(dst, 4 * ckpt.disk_bytes())
    latent_prefix = {}
    for k in ckpt.keys():  # the converted layers' experts prefixes
        if re.search(r"\.experts\.(gate|up|down)_(A|B|proj)$", k) and str(layer_index(k)) in molae.layers:
            latent_prefix[layer_index(k)] = k.rsplit(".", 1)[0]
    writer = ShardWriter(temp_dir_for(dst), dict(src=str(ckpt.path), dtype=dtype, op="decompress"),
                         parse_size(max_shard_size), resume=resume)
    with removed_on_error(writer.tmp):
        _decompress_units(ckpt, molae, latent_prefix, dtype, device, writer)
        config = {k: v for k, v in ckpt.config.items() if k != "molae"}
        config["model_type"] = molae.base_model_type
        config["architectures"] = [a.removeprefix("Molae") for a in config.get("architectures", [])]
        (writer.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_aux_files(ckpt.path, writer.tmp)
        publish(writer.tmp, dst, overwrite)
    return dict(layers_decompressed=len(latent_prefix))


def _decompress_units(ckpt, molae, latent_prefix, dtype, device, writer):
    for unit, keys, _ in progress_bar(_units(ckpt, {}), desc="decompress", unit="layer"):  # every key: no source groups
        if unit in writer.done:
            continue
        i = None if unit == "rest" else int(unit.split(".")[1])
        prefix = latent_prefix.get(i)
        factor_keys = [k for k in keys if prefix and k.startswith(prefix + ".")]
        copy_tensors(ckpt, [k for k in keys if k not in factor_keys], writer)
        if prefix:
            tensors = {k[len(prefix) + 1:]: t.to(device) for k, t in ckpt.read(factor_keys).items()}
            dense = multiply_out({k: t.float() if t.is_floating_point() else t for k, t in tensors.items()})
            out_dtype = next(t.dtype for t in tensors.values() if t.is_floating_point()) if dtype == "auto" \
                else DTYPES[dtype]
            src = molae.source_layout[str(i)]
            E, m, n = dense["gate"].shape
            ExpertGroup(prefix, i, src["layout"], E, m, n, [], src["names"]).write(
                writer, {k: v.to(out_dtype) for k, v in dense.items()})
        writer.end_unit(unit, None)
    writer.finish()




