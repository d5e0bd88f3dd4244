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
from tqdm.auto import tqdm

from .checkpoint import (CheckpointError, ShardWriter, SourceCheckpoint, check_destination, check_disk_space,
                         copy_aux_files, parse_size, publish, removed_on_error, resolve, temp_dir_for,
                         write_json_atomically)
from .factorize import factorize_projection
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


def copy_tensors(ckpt: SourceCheckpoint, keys: list[str], writer: ShardWriter, chunk: int = 64):
    """Hand tensors to the writer exactly as stored, reading a few at a time."""
    for i in range(0, len(keys), chunk):
        for k, t in ckpt.read(keys[i:i + chunk]).items():
            writer.add(k, t)


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


def _plan(ckpt, groups, opts: ConvertOptions) -> dict[str, dict]:
    """{layer: {"latent": {kind: d}, "groups": G}} for the layers to convert; every argument checked
    against every layer before anything is written."""
    check_projections(opts.projections)
    if opts.rank_ratio is not None and not (0 < opts.rank_ratio <= 1):
        raise ValueError(f"--rank-ratio {opts.rank_ratio} is out of range: allowed 0 < rank_ratio <= 1")
    if opts.dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype {opts.dtype} is not known: allowed auto, {', '.join(DTYPES)}")
    by_layer = {g.layer: g for g in groups.values()}
    plan = {}
    for i in parse_layers(opts.layers, sorted(by_layer)):
        g = by_layer[i]
        try:
            check_groups(opts.groups, g.n_experts)
        except ValueError as e:
            raise ValueError(f"--groups: {e}") from None
        latent = resolve_latent_dims(opts.latent_dim, opts.projections, g.inter, g.dim)
        for kind, d in latent.items():
            try:
                check_latent_dim(d, g.n_experts // opts.groups * g.inter, g.dim, name="latent_dim")
            except ValueError as e:
                raise ValueError(f"--latent-dim for layer {i}: {e}") from None
        plan[str(i)] = dict(latent=latent, groups=opts.groups)
    return plan


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here; use --device cpu")
    return device


def convert_checkpoint(src, dst, opts: ConvertOptions, report: Path | None = None, resume=False,
                       overwrite=False) -> dict:
    """Convert the MoE checkpoint at `src` (directory or hub id) into a MoLAE checkpoint at `dst`."""
    dst = Path(dst)
    check_destination(dst, overwrite)
    ckpt = SourceCheckpoint(resolve(src))
    groups = find_expert_groups(ckpt)
    base_type = _check_family(ckpt, groups)
    plan = _plan(ckpt, groups, opts)
    device = check_device(opts.device)
    check_disk_space(dst, ckpt.disk_bytes() + 2**20)
    options = dict(asdict(opts), src=str(ckpt.path), projections=list(opts.projections))
    options.pop("device")  # a run may resume on another device
    writer = ShardWriter(temp_dir_for(dst), options, parse_size(opts.max_shard_size), resume=resume)
    with removed_on_error(writer.tmp):
        return _convert_units(ckpt, groups, plan, opts, base_type, device, writer, dst, report, overwrite)


def _convert_units(ckpt, groups, plan, opts, base_type, device, writer, dst, report, overwrite) -> dict:
    units = _units(ckpt, groups)
    for unit, copied, group in tqdm(units, desc="convert", unit="layer"):
        if unit in writer.done:
            continue
        t0 = time.perf_counter()
        copy_tensors(ckpt, copied, writer)
        rows = []
        if group is not None and str(group.layer) in plan:
            rows = _convert_group(ckpt, group, plan[str(group.layer)], opts, device, writer)
        elif group is not None:
            copy_tensors(ckpt, group.keys, writer)  # a layer left out by --layers: as it is
        writer.end_unit(unit, rows)
        seconds = time.perf_counter() - t0  # read, factorize and write (when the shard filled)
        for r in rows:  # the same dicts the writer holds: the report gets them
            r["unit_seconds"] = seconds
    weight_map = writer.finish()
    tmp = writer.tmp
    molae = dict(version=1, base_model_type=base_type, layers=plan, options=dict(
        latent_dim=opts.latent_dim, rank_ratio=opts.rank_ratio, groups=opts.groups,
        projections=list(check_projections(opts.projections))),
        source_layout={str(g.layer): dict(layout=g.layout, names=g.names) for g in groups.values()})
    config = dict(ckpt.config, model_type=f"molae_{base_type}", molae=molae,
                  architectures=[f"Molae{a}" for a in ckpt.config.get("architectures", [])])
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_aux_files(ckpt.path, tmp)
    rows = [r for unit, *_ in units for r in writer.done.get(unit, [])]
    summary = _summary(ckpt, groups, plan, rows, weight_map, tmp)
    if report is not None:
        write_json_atomically(Path(report), summary)
    publish(tmp, dst, overwrite)
    return summary


def _convert_group(ckpt, group: ExpertGroup, spec: dict, opts: ConvertOptions, device, writer) -> list[dict]:
    """One layer's experts, one projection kind at a time: read, factorize on `device`, hand over."""
    rows = []
    for kind in KINDS:
        W = group.read_kind(ckpt, kind)
        out_dtype = W.dtype if opts.dtype == "auto" else DTYPES[opts.dtype]
        if kind in spec["latent"]:  # a kind kept whole needs no trip to the device
            W = W.to(device)
        try:
            params, row = factorize_projection(W, kind, spec["latent"].get(kind), spec["groups"], opts.rank_ratio)
        except ValueError as e:
            raise ValueError(f"layer {group.layer} ({group.prefix}): {e}") from None
        del W
        for name, t in params.items():
            writer.add(f"{group.prefix}.{name}", t.to(out_dtype))
        rows.append(dict(layer=group.layer, **row))
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
    return dict(layers_converted=len(plan), layers=rows, before=before, after=after)


def format_summary(summary: dict) -> str:
    """A short table: per projection kind over the converted layers, then the totals."""
    lines = [f"converted {summary['layers_converted']} MoE layers", "",
             "| projection | latent d | rel. Frobenius error (mean / max) | energy kept (mean / min) |",
             "|---|---|---|---|"]
    for kind in KINDS:
        rs = [r for r in summary["layers"] if r["kind"] == kind and r["latent_dim"]]
        if rs:
            ds = sorted({r["latent_dim"] for r in rs})
            err = [r["rel_error"] for r in rs]
            en = [r["energy_kept"] for r in rs]
            lines.append(f"| {kind} | {','.join(map(str, ds))} | {sum(err) / len(err):.4f} / {max(err):.4f} | "
                         f"{sum(en) / len(en):.4f} / {min(en):.4f} |")
    lines += ["", "| | before | after | change |", "|---|---:|---:|---:|"]
    b, a = summary["before"], summary["after"]
    for key, label in (("total", "total parameters"), ("expert", "routed-expert parameters"),
                       ("non_embedding", "non-embedding parameters"), ("bytes_on_disk", "bytes on disk")):
        lines.append(f"| {label} | {b[key]:,} | {a[key]:,} | {100 * (a[key] - b[key]) / max(b[key], 1):+.1f}% |")
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
    for unit, keys, _ in tqdm(_units(ckpt, {}), desc="decompress", unit="layer"):  # every key: no source groups
        if unit in writer.done:
            continue
        i = None if unit == "rest" else int(unit.split(".")[1])
        prefix = latent_prefix.get(i)
        factor_keys = [k for k in keys if prefix and k.startswith(prefix + ".")]
        copy_tensors(ckpt, [k for k in keys if k not in factor_keys], writer)
        if prefix:
            tensors = {k[len(prefix) + 1:]: t.to(device) for k, t in ckpt.read(factor_keys).items()}
            dense = multiply_out({k: t.float() for k, t in tensors.items()})
            out_dtype = next(iter(tensors.values())).dtype if dtype == "auto" else DTYPES[dtype]
            src = molae["source_layout"][str(i)]
            E, m, n = dense["gate"].shape
            ExpertGroup(prefix, i, src["layout"], E, m, n, [], src["names"]).write(
                writer, {k: v.to(out_dtype) for k, v in dense.items()})
        writer.end_unit(unit, None)
    writer.finish()




