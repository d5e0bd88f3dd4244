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
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from .command import progress_bar

from .checkpoint import (CheckpointError, ShardWriter, SourceCheckpoint, check_destination, check_disk_space,
                         copy_aux_files, parse_size, publish, removed_on_error, resolve, temp_dir_for,
                         write_json_atomically)
from . import baselines
from .command import check_device
from .factorize import (allocate_latent, factorize_projection, regularized_grams, similarity_groups, spectrum,
                        whiten)
from .layers import KINDS, check_groups, check_latent_dim, check_projections, multiply_out, resolve_latent_dims
from .models import SUPPORTED, is_embedding, layer_index

PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<name>gate_proj|up_proj|down_proj|w1|w2|w3)"
                        r"\.weight$")
FUSED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<name>gate_up_proj|down_proj)$")
KIND_OF = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
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

    def read_kind(self, ckpt: SourceCheckpoint, kind: str, chunk: int = 16) -> torch.Tensor:
        """One projection kind of all experts, [E, m, n] (gate, up) or [E, n, m] (down), in the source
        dtype on the CPU; read a few experts at a time so that little more than the result is held."""
        if self.layout == "fused":
            if kind == "down":
                return ckpt.read_slice(f"{self.prefix}.down_proj", (slice(None),))
            rows = slice(0, self.inter) if kind == "gate" else slice(self.inter, 2 * self.inter)
            return ckpt.read_slice(f"{self.prefix}.gate_up_proj", (slice(None), rows))
        keys = [f"{self.prefix}.{e}.{self.names[kind]}.weight" for e in range(self.n_experts)]
        out = None
        for i in range(0, self.n_experts, chunk):
            part = ckpt.read(keys[i:i + chunk])
            for e in range(i, min(i + chunk, self.n_experts)):
                t = part.pop(keys[e])
                if out is None:
                    out = torch.empty((self.n_experts, *t.shape), dtype=t.dtype)
                out[e] = t
        return out

    def write(self, writer: ShardWriter, dense: dict[str, torch.Tensor]):
        """Write whole expert weights back in this group's source layout."""
        if self.layout == "fused":
            writer.add(f"{self.prefix}.gate_up_proj", torch.cat([dense["gate"], dense["up"]], dim=1))
            writer.add(f"{self.prefix}.down_proj", dense["down"])
            return
        for kind in KINDS:
            for e in range(self.n_experts):
                writer.add(f"{self.prefix}.{e}.{self.names[kind]}.weight", dense[kind][e])


def find_expert_groups(ckpt: SourceCheckpoint) -> dict[str, ExpertGroup]:
    """Group the source's expert tensors by experts prefix, checking each group is complete."""
    found: dict[str, dict] = {}
    for key in ckpt.keys():
        if m := PER_EXPERT.match(key):
            layout = "per_expert"
        elif m := FUSED.match(key):
            layout = "fused"
        else:
            continue
        g = found.setdefault(m["prefix"], dict(layout=layout, keys=[], names={}, experts=set()))
        if g["layout"] != layout:
            raise CheckpointError(f"{m['prefix']} mixes per-expert and fused tensors: the checkpoint is inconsistent")
        if layout == "per_expert":
            g["names"][KIND_OF[m["name"]]] = m["name"]
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
    method: str = "molae"  # or a baseline (molae.baselines.METHODS)
    budget: float | None = None  # fraction of the routed-expert parameters to keep
    calibration: str | None = None  # text file, directory or prepared data directory
    calib_tokens: int = 65536
    calib_seq_len: int = 512
    group_by: str = "index"  # or "similarity"
    damp: float = 0.01  # ridge on calibration Grams, relative to their mean diagonal
    mobe_bases: int | None = None  # MoBE's J (None: max(2, E // 8))
    mobe_steps: int = 500


def check_options(opts: ConvertOptions, have_stats: bool = False):
    """Every option checked alone and against the others, before any work."""
    if not check_projections(opts.projections):
        raise ValueError(f"--projections {','.join(opts.projections)!r} names no projection: allowed a comma list "
                         "of gate, up, down")
    if opts.method not in baselines.METHODS:
        raise ValueError(f"--method {opts.method} is not known: allowed {', '.join(baselines.METHODS)}")
    if opts.rank_ratio is not None and not (0 < opts.rank_ratio <= 1):
        raise ValueError(f"--rank-ratio {opts.rank_ratio} is out of range: allowed 0 < rank_ratio <= 1")
    if opts.dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype {opts.dtype} is not known: allowed auto, {', '.join(DTYPES)}")
    if opts.budget is not None and not 0 < opts.budget < 1:
        raise ValueError(f"--budget {opts.budget} is out of range: allowed 0 < budget < 1 (a fraction of the "
                         "routed-expert parameters)")
    if opts.group_by not in ("index", "similarity"):
        raise ValueError(f"--group-by {opts.group_by} is not known: allowed index or similarity")
    calibrated = have_stats or opts.calibration is not None
    if opts.rank_ratio is not None and calibrated:
        raise ValueError("--rank-ratio is the data-free method's step 1: leave it out with --calibration")
    if opts.budget is not None and opts.latent_dim is not None:
        raise ValueError("--budget and --latent-dim both choose the latent size: give one of them")
    if opts.method != "molae":
        if opts.budget is None and not (opts.method == "svd" and opts.latent_dim):
            raise ValueError(f"--method {opts.method} needs --budget FRACTION (the routed-expert parameters to keep)")
        if opts.groups != 1 or opts.group_by != "index" or opts.rank_ratio is not None:
            raise ValueError(f"--groups, --group-by and --rank-ratio are MoLAE options: leave them out with "
                             f"--method {opts.method}")
    if opts.method in baselines.NEEDS_CALIBRATION and not calibrated:
        raise ValueError(f"--method {opts.method} needs --calibration FILE_OR_DIR (it scores experts on data)")
    if opts.method in baselines.PRUNE_METHODS and opts.layers not in (None, "all"):
        raise ValueError(f"--method {opts.method} changes the model's expert count: it prunes all layers, "
                         "leave out --layers")
    if opts.calib_tokens < 1 or opts.calib_seq_len < 2:
        raise ValueError("--calib-tokens must be >= 1 and --calib-seq-len >= 2")


def _grams(stats: dict | None, prior_tokens: float = 64.0) -> dict[str, torch.Tensor] | None:
    """One layer's regularized per-expert input Grams per kind (gate/up: x, down: h), or None."""
    if stats is None:
        return None
    x = regularized_grams(stats["x_gram"], stats["count"], prior_tokens)
    return {"gate": x, "up": x, "down": regularized_grams(stats["h_gram"], stats["count"], prior_tokens)}


def _similarity_perm(ckpt, g: "ExpertGroup", kinds, groups: int, grams, device) -> list[int]:
    """Slot order of one layer's experts: equal groups with similar (whitened) row spaces in R^n."""
    mats = []
    for kind in kinds:
        W = g.read_kind(ckpt, kind).to(device).double()
        W = W.transpose(1, 2) if kind == "down" else W  # down's columns live in R^n: compare W^T
        if grams is not None and kind != "down":
            W = W @ whiten(grams[kind].sum(0).to(device))
        mats.append(W)
    return similarity_groups(mats, groups).tolist()


def _plan(ckpt, groups, opts: ConvertOptions, stats: dict | None, device) -> dict[str, dict]:
    """{layer: spec} for the layers to convert: MoLAE form {"latent": {kind: d}, "groups": G
    [, "perm": slot order]}, {"method": name} for the whole-matrix baselines, {"keep": [experts]} for
    pruning. Every argument checked against every layer before anything is written."""
    by_layer = {g.layer: g for g in groups.values()}
    chosen = parse_layers(opts.layers, sorted(by_layer))
    if stats is not None:
        missing = [i for i in chosen if i not in stats]
        if missing:
            raise ValueError(f"the calibration statistics have no layers {missing}: they come from another model")
    plan = {}
    for i in chosen:
        g = by_layer[i]
        if opts.method in baselines.DENSE_METHODS:
            plan[str(i)] = dict(method=opts.method)
            continue
        if opts.method in baselines.PRUNE_METHODS:
            top_k = ckpt.config.get("num_experts_per_tok", 1)
            plan[str(i)] = dict(keep=baselines.keep_experts(stats[i], opts.budget, top_k, opts.method))
            continue
        G = g.n_experts if opts.method == "svd" else opts.groups
        try:
            check_groups(G, g.n_experts)
        except ValueError as e:
            raise ValueError(f"--groups: {e}") from None
        if opts.method == "svd" and opts.budget is not None:
            r = baselines.svd_rank(opts.budget, g.n_experts, g.inter, g.dim)
            latent = dict.fromkeys(check_projections(opts.projections), r)
        elif opts.budget is not None:
            latent = dict.fromkeys(check_projections(opts.projections), 1)  # set by _allocate below
        else:
            latent = resolve_latent_dims(opts.latent_dim, opts.projections, g.inter, g.dim)
        for kind, d in latent.items():
            try:
                check_latent_dim(d, g.n_experts // G * g.inter, g.dim, name="latent_dim")
            except ValueError as e:
                raise ValueError(f"--latent-dim for layer {i}: {e}") from None
        plan[str(i)] = dict(latent=latent, groups=G)
        if opts.group_by == "similarity" and G > 1:
            plan[str(i)]["perm"] = _similarity_perm(ckpt, g, list(latent) or list(KINDS), G,
                                                    _grams(stats.get(i) if stats else None), device)
    if opts.method == "molae" and opts.budget is not None:
        _allocate(ckpt, by_layer, plan, opts, stats, device)
    return plan


def _allocate(ckpt, by_layer, plan, opts, stats, device):
    """--budget: latent sizes per layer and kind with the least summed relative (whitened) error;
    kinds kept whole count against the budget in full."""
    items, fixed, total = {}, 0, 0
    for key, spec in progress_bar(plan.items(), desc="allocate", unit="layer"):
        g = by_layer[int(key)]
        grams = _grams(stats.get(int(key)) if stats else None)
        dense = g.n_experts * g.inter * g.dim
        total += 3 * dense
        perm = spec.get("perm")
        G, Eg = spec["groups"], g.n_experts // spec["groups"]
        for kind in KINDS:
            if kind not in spec["latent"]:
                fixed += dense
                continue
            W = g.read_kind(ckpt, kind).to(device)
            gram = None if grams is None else grams[kind].to(device)
            if perm is not None:
                W, gram = W[perm], None if gram is None else gram[perm]
            sig = [spectrum(W[j * Eg:(j + 1) * Eg], kind, None if gram is None else gram[j * Eg:(j + 1) * Eg],
                            opts.damp).cpu() for j in range(G)]
            n = max(len(s) for s in sig)
            sigma2 = sum(torch.nn.functional.pad(s, (0, n - len(s))) for s in sig)
            items[(key, kind)] = dict(sigma2=sigma2, energy=sigma2.sum().item(), cost=G * g.dim + g.n_experts * g.inter,
                                      dense=dense)
    d = allocate_latent(items, int(opts.budget * total) - fixed)
    for (key, kind), dk in d.items():
        plan[key]["latent"][kind] = dk


def convert_checkpoint(src, dst, opts: ConvertOptions, report: Path | None = None, resume=False,
                       overwrite=False, stats: dict | None = None) -> dict:
    """Convert the MoE checkpoint at `src` (directory or hub id) into a MoLAE checkpoint at `dst` (or,
    with a baseline --method, a compressed checkpoint of the source's own family). `stats`: calibration
    statistics already collected for this source (`molae.calibrate`), instead of opts.calibration."""
    dst = Path(dst)
    check_destination(dst, overwrite)
    check_options(opts, have_stats=stats is not None)
    device = check_device(opts.device)
    ckpt = SourceCheckpoint(resolve(src))
    check_not_molae(ckpt, "convert")
    groups = find_expert_groups(ckpt)
    base_type = _check_family(ckpt, groups)
    if stats is None and opts.calibration is not None:
        from .calibrate import calibrate
        stats = calibrate(ckpt.path, opts.calibration, opts.calib_tokens, opts.calib_seq_len, device,
                          outputs=opts.method == "hcsmoe", fisher=opts.method == "d2moe")
    plan = _plan(ckpt, groups, opts, stats, device)
    check_disk_space(dst, ckpt.disk_bytes() + 2**20)
    options = dict(asdict(opts), src=str(ckpt.path), projections=list(opts.projections))
    options.pop("device")  # a run may resume on another device
    writer = ShardWriter(temp_dir_for(dst), options, parse_size(opts.max_shard_size), resume=resume)
    with removed_on_error(writer.tmp):
        return _convert_units(ckpt, groups, plan, opts, base_type, device, writer, dst, report, overwrite, stats)


def _router_rows(ckpt, group: ExpertGroup, keys: list[str], keep: list[int]) -> dict:
    """{key: kept rows} for the router tensors of a pruned layer: tensors of its MoE block (outside the
    experts and shared experts) with one row per expert (gate weight [E, n], correction bias [E])."""
    block = group.prefix.rsplit(".experts", 1)[0] + "."
    rows = {k: keep for k in keys if k.startswith(block) and "shared" not in k
            and ckpt.shape(k)[0] == group.n_experts}
    if not any(len(ckpt.shape(k)) == 2 for k in rows):
        raise CheckpointError(f"{block[:-1]}: no router weight [{group.n_experts}, n] found to prune")
    return rows


def _convert_units(ckpt, groups, plan, opts, base_type, device, writer, dst, report, overwrite, stats) -> dict:
    units = _units(ckpt, groups)
    for unit, copied, group in progress_bar(units, desc="convert", unit="layer"):
        if unit in writer.done:
            continue
        t0 = time.perf_counter()
        spec = plan.get(str(group.layer)) if group is not None else None
        copy_tensors(ckpt, copied, writer, rows=_router_rows(ckpt, group, copied, spec["keep"])
                     if spec and "keep" in spec else None)
        rows = []
        if spec is not None:
            layer_stats = stats.get(group.layer) if stats else None
            rows = _convert_group(ckpt, group, spec, opts, device, writer, layer_stats)
        elif group is not None:
            copy_tensors(ckpt, group.keys, writer)  # a layer left out by --layers: as it is
        writer.end_unit(unit, rows)
        seconds = time.perf_counter() - t0  # read, factorize and write (when the shard filled)
        for r in rows:  # the same dicts the writer holds: the report gets them
            r["unit_seconds"] = seconds
    weight_map = writer.finish()
    tmp = writer.tmp
    rows = [r for unit, *_ in units for r in writer.done.get(unit, [])]
    summary = _summary(ckpt, groups, plan, rows, weight_map, tmp)
    summary["method"] = opts.method
    options = dict(method=opts.method, budget=opts.budget, latent_dim=opts.latent_dim, rank_ratio=opts.rank_ratio,
                   groups=opts.groups, group_by=opts.group_by, projections=list(check_projections(opts.projections)),
                   calibration=opts.calibration, calib_tokens=opts.calib_tokens if stats else None)
    if opts.method in ("molae", "svd"):
        layers = {k: {"latent": v["latent"], "groups": v["groups"], **({"permuted": True} if "perm" in v else {})}
                  for k, v in plan.items()}
        molae = dict(version=1, base_model_type=base_type, layers=layers, options=options,
                     source_layout={str(g.layer): dict(layout=g.layout, names=g.names) for g in groups.values()})
        config = dict(ckpt.config, model_type=f"molae_{base_type}", molae=molae,
                      architectures=[f"Molae{a}" for a in ckpt.config.get("architectures", [])])
    else:  # the source's own architecture; what the method stores, recorded
        config = dict(ckpt.config, molae_compression=dict(options, routed_params_stored=summary["after"]["expert_stored"],
                                                          routed_params_before=summary["before"]["expert"]))
        if opts.method in baselines.PRUNE_METHODS:
            kept = len(next(iter(plan.values()))["keep"])
            for key in ("num_experts", "num_local_experts", "n_routed_experts"):
                if key in config:
                    config[key] = kept
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_aux_files(ckpt.path, tmp)
    if report is not None:
        write_json_atomically(Path(report), summary)
    publish(tmp, dst, overwrite)
    return summary


def _convert_group(ckpt, group: ExpertGroup, spec: dict, opts: ConvertOptions, device, writer,
                   stats: dict | None) -> list[dict]:
    """One layer's experts: MoLAE form one projection kind at a time (read, factorize on `device`, hand
    over); a baseline on the whole layer."""
    if "latent" not in spec:
        return _baseline_group(ckpt, group, spec, opts, device, writer, stats)
    grams = _grams(stats)
    perm = torch.tensor(spec["perm"]) if "perm" in spec else None
    rows = []
    for kind in KINDS:
        W = group.read_kind(ckpt, kind)
        out_dtype = W.dtype if opts.dtype == "auto" else DTYPES[opts.dtype]
        gram = None
        if kind in spec["latent"]:  # a kind kept whole needs no trip to the device
            W = W.to(device)
            gram = None if grams is None else grams[kind].to(device)
        try:
            params, row = factorize_projection(W, kind, spec["latent"].get(kind), spec["groups"], opts.rank_ratio,
                                               gram=gram, perm=perm, damp=opts.damp)
        except ValueError as e:
            raise ValueError(f"layer {group.layer} ({group.prefix}): {e}") from None
        del W, gram
        for name, t in params.items():
            writer.add(f"{group.prefix}.{name}", t.to(out_dtype))
        rows.append(dict(layer=group.layer, **row))
    if perm is not None:  # router id -> slot
        writer.add(f"{group.prefix}.expert_slot", torch.argsort(perm))
    return rows


def _baseline_group(ckpt, group: ExpertGroup, spec, opts: ConvertOptions, device, writer, stats) -> list[dict]:
    """Whole-matrix baselines and pruning: the layer's experts in the source layout, and what the
    method stores per kind (params_after; params_on_disk is what the whole matrices take)."""
    W = {kind: group.read_kind(ckpt, kind) for kind in KINDS}
    out_dtype = W["gate"].dtype if opts.dtype == "auto" else DTYPES[opts.dtype]
    E, m, n = group.n_experts, group.inter, group.dim
    rows, info, layer_info = [], {}, {}  # per kind (d2moe, mobe); for the layer (kept experts, clusters)
    if "keep" in spec:
        keep = torch.tensor(spec["keep"])
        out = {k: v[keep] for k, v in W.items()}
        stored = {k: v.numel() for k, v in out.items()}
        layer_info = dict(kept=spec["keep"])
    elif spec["method"] == "hcsmoe":
        out, total, labels = baselines.hcsmoe({k: v.to(device) for k, v in W.items()}, stats, opts.budget)
        stored = {k: total // 3 for k in KINDS}
        layer_info = dict(clusters=labels)
    else:
        grams = _grams(stats)
        out, stored = {}, {}
        for kind in KINDS:
            Wk = W[kind].to(device)
            if kind not in check_projections(opts.projections):
                out[kind], stored[kind] = Wk, Wk.numel()
                continue
            if spec["method"] == "d2moe":
                gram = None if grams is None else grams[kind].to(device)
                out[kind], stored[kind], r = baselines.d2moe(Wk, opts.budget, None if stats is None else stats["fisher"],
                                                             gram, opts.damp)
                info[kind] = dict(rank=r)
            else:  # mobe; down fitted transposed (A_i the smaller side)
                fit = Wk.transpose(1, 2) if kind == "down" else Wk
                W_hat, stored[kind], info[kind] = baselines.mobe(fit, opts.budget, opts.mobe_bases, opts.mobe_steps)
                out[kind] = W_hat.transpose(1, 2) if kind == "down" else W_hat
    for kind in KINDS:
        Wd, Od = W[kind].double(), out[kind].double().cpu()
        if "keep" in spec:  # the pruned experts' share of the weights' norm
            err = (1 - Od.square().sum() / Wd.square().sum().clamp_min(1e-300)).clamp_min(0).sqrt()
        else:
            err = (Wd - Od).norm() / Wd.norm().clamp_min(1e-300)
        rows.append(dict(layer=group.layer, kind=kind, method=opts.method, rel_error=err.item(), latent_dim=None,
                         params_before=W[kind].numel(), params_after=int(stored[kind]),
                         params_on_disk=out[kind].numel(), info=info.get(kind, layer_info)))
    kept_E = out["gate"].shape[0]
    ExpertGroup(group.prefix, group.layer, group.layout, kept_E, m, n, [], group.names).write(
        writer, {k: v.to(out_dtype).cpu().contiguous() for k, v in out.items()})
    return rows


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
    molae = ckpt.config.get("molae")
    if not isinstance(molae, dict) or "layers" not in molae:
        raise CheckpointError(f"{ckpt.path} is not a MoLAE checkpoint (its config.json has no molae section): "
                              "decompress takes the output of molae convert")
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype {dtype} is not known: allowed auto, {', '.join(DTYPES)}")
    device = check_device(device)
    check_disk_space(dst, 4 * ckpt.disk_bytes())
    layouts = molae["source_layout"]
    latent_prefix = {}
    for k in ckpt.keys():  # the converted layers' experts prefixes
        if re.search(r"\.experts\.(gate|up|down)_(A|B|proj)$", k) and str(layer_index(k)) in molae["layers"]:
            latent_prefix[layer_index(k)] = k.rsplit(".", 1)[0]
    writer = ShardWriter(temp_dir_for(dst), dict(src=str(ckpt.path), dtype=dtype, op="decompress"),
                         parse_size(max_shard_size), resume=resume)
    with removed_on_error(writer.tmp):
        _decompress_units(ckpt, molae, latent_prefix, dtype, device, writer)
        config = {k: v for k, v in ckpt.config.items() if k != "molae"}
        config["model_type"] = molae["base_model_type"]
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
            src = molae["source_layout"][str(i)]
            E, m, n = dense["gate"].shape
            ExpertGroup(prefix, i, src["layout"], E, m, n, [], src["names"]).write(
                writer, {k: v.to(out_dtype) for k, v in dense.items()})
        writer.end_unit(unit, None)
    writer.finish()




