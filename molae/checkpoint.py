"""Streaming sharded safetensors checkpoints: read a few tensors at a time, write shards as we go.

Reading opens a shard only while its tensors for the current unit of work are read, so the
pages it maps are released before the next unit (peak host memory stays near one layer).
Writing goes to a temporary directory beside the destination; shards are flushed at unit
boundaries (a unit is one decoder layer, or the remaining top-level tensors) and a
`progress.json` records which units are safely on disk, so an interrupted run resumes from
the last flushed unit. The destination appears only when everything is written (rename).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .command import Interrupted, human_bytes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# files of a checkpoint directory that are not copied beside the new weights
NOT_COPIED = {"config.json", INDEX, "progress.json"}
NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message says what to do."""


class ResumableError(CheckpointError):
    """A failure that --resume can continue from once its cause is fixed (e.g. a full disk)."""


def resolve(src: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded to the local cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{src} is a file: pass the checkpoint directory (config.json and *.safetensors)")
    text = str(src)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{src} does not exist: pass a checkpoint directory or a hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.jinja", "*.tiktoken"]))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise CheckpointError(f"{src} is not a local directory and could not be downloaded from the hub "
                              f"({type(e).__name__}): pass a local checkpoint directory") from e


class SourceCheckpoint:
    """config.json and the tensors of a (possibly sharded) safetensors checkpoint directory."""

    def __init__(self, path: Path):
        self.path = path
        cfg = path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
        try:
            self.config = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg} is not valid JSON ({e}): restore the file") from e
        if (path / INDEX).is_file():
            self.weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        elif (path / SINGLE).is_file():
            self.weight_map = {k: SINGLE for k in self._keys_of(SINGLE)}
        else:
            raise CheckpointError(f"{path} has no {SINGLE} or {INDEX}: molae reads safetensors checkpoints")
        self.files = sorted(set(self.weight_map.values()))
        missing = [f for f in self.files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path} lacks shard(s) {missing} named in its index: download them again")
        self._meta = {}
        for f in self.files:  # read every header now: a corrupt or truncated shard fails before any work
            self._meta.update(self._header(f))
        absent = set(self.weight_map) - set(self._meta)
        if absent:
            raise CheckpointError(f"{path}: {len(absent)} tensors of the index are in no shard "
                                  f"(e.g. {sorted(absent)[0]}): the checkpoint is incomplete")
        self.scales = self._fp8_scales()

    def _fp8_scales(self) -> dict[str, str]:
        """{fp8 weight key: its block scale key} of a block-quantized fp8 checkpoint (DeepSeek-V3's and the
        Qwen3 FP8 releases' layout: `W.weight_scale_inv` [ceil(rows/b), ceil(cols/b)] beside `W.weight`,
        b from quantization_config.weight_block_size); every fp8 tensor must have one."""
        fp8 = [k for k, (_, dt) in self._meta.items() if dt.startswith("F8")]
        if not fp8:
            return {}
        qc = self.config.get("quantization_config") or {}
        block = qc.get("weight_block_size")
        if qc.get("quant_method") != "fp8" or not block or len(block) != 2:
            raise CheckpointError(f"{self.path} holds fp8 tensors (e.g. {fp8[0]}) but its config.json has no "
                                  "fp8 quantization_config with weight_block_size: molae reads block-quantized fp8 "
                                  "(DeepSeek-V3, Qwen3 FP8); restore config.json")
        self.block = tuple(block)
        scales = {}
        for k in fp8:
            sk = k.removesuffix("weight") + "weight_scale_inv"
            if sk not in self.weight_map:
                raise CheckpointError(f"{self.path}: fp8 tensor {k} has no {sk}: the checkpoint lacks its scales; "
                                      "download it again")
            shape = self._meta[k][0]
            want = tuple(-(-d // b) for d, b in zip(shape, self.block))
            if len(shape) != 2 or self._meta[sk][0] != want:
                raise CheckpointError(f"{self.path}: {sk} is {self._meta[sk][0]}, expected {want} for {k} {shape} "
                                      f"in blocks of {self.block}: the checkpoint is inconsistent")
            scales[k] = sk
        return scales

    def _open(self, file):
        try:
            return safe_open(self.path / file, framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path / file} is truncated or corrupt ({e}): download it again") from e

    def _keys_of(self, file):
        with self._open(file) as f:
            return list(f.keys())

    def _header(self, file) -> dict:
        out = {}
        with self._open(file) as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
        return out

    def keys(self) -> list[str]:
        """Every tensor, fp8 block scales excepted (they are folded into their weights on read)."""
        scale_keys = set(self.scales.values())
        return [k for k in self.weight_map if k not in scale_keys]

    def dtype(self, key) -> torch.dtype:
        """The dtype `read` returns for `key` (bfloat16 for an fp8 tensor)."""
        name = self._meta[key][1]
        return torch.bfloat16 if key in self.scales else _SAFETENSORS_DTYPES.get(name, torch.float32)

    def _dequantized(self, key: str, t: torch.Tensor, device=None) -> torch.Tensor:
        """`t` on `device` (default: where it is); an fp8 tensor times its block scales, as bfloat16,
        computed there (on a GPU, far faster than on the host)."""
        t = t if device is None else t.to(device)
        if key not in self.scales:
            return t
        sk = self.scales[key]
        with self._open(self.weight_map[sk]) as f:
            scale = f.get_tensor(sk).to(t.device, torch.float32)
        (r, c), (br, bc) = t.shape, self.block
        q = torch.nn.functional.pad(t.float(), (0, -c % bc, 0, -r % br))
        blocks = q.view(q.shape[0] // br, br, q.shape[1] // bc, bc) * scale[:, None, :, None]
        return blocks.view_as(q)[:r, :c].to(torch.bfloat16)

    def shape(self, key) -> tuple[int, ...]:
        return self._meta[key][0]

    def numel(self, key) -> int:
        n = 1
        for s in self.shape(key):
            n *= s
        return n

    def disk_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)

    def read_slice(self, key: str, index: tuple, device=None) -> torch.Tensor:
        """Part of one tensor (e.g. index (slice(None), slice(0, m))), reading only that part."""
        if key in self.scales:  # blocks do not slice: dequantize the whole tensor, then take the part
            return self.read([key], device)[key][index]
        with self._open(self.weight_map[key]) as f:
            try:
                part = f.get_slice(key)[index]
                return part if device is None else part.to(device)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{self.path / self.weight_map[key]}: tensor {key} cannot be read ({e}): "
                                      "the shard is corrupt; download it again") from e

    def read(self, keys, device=None) -> dict[str, torch.Tensor]:
        """The tensors of `keys` (on `device` if given), opening each shard once and closing it afterwards."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for file, ks in by_file.items():
            with self._open(file) as f:
                for k in ks:
                    try:
                        out[k] = self._dequantized(k, f.get_tensor(k), device)
                    except (SafetensorError, OSError, RuntimeError) as e:
                        raise CheckpointError(f"{self.path / file}: tensor {k} cannot be read ({e}): "
                                              "the shard is corrupt; download it again") from e
        return out


def copy_aux_files(src: Path, dst: Path):
    """Tokenizer, generation config, chat template and other small files beside the weights."""
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in NOT_COPIED and not p.name.endswith(NOT_COPIED_SUFFIXES):
            shutil.copy2(p, dst / p.name)


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or an int of bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * mult)
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise ValueError(f"size {text!r} is not understood: write e.g. 2GB, 500MB or a number of bytes")


@dataclass
class ShardWriter:
    """Collects output tensors, flushes shards at unit boundaries, records progress for --resume."""

    tmp: Path
    options: dict  # what the run was asked to do; a resumed run must ask the same
    max_shard_bytes: int
    resume: bool = False
    done: dict = field(default_factory=dict)  # unit id -> info recorded when the unit finished
    shards: list = field(default_factory=list)  # [{"file", "keys"}]
    state: dict = field(default_factory=dict)  # what else a resumed run needs (the plan, the carry file)
    before_progress: object = None  # called before finished units are recorded; returns updates to `state`
    flushes: int = 0
    _buffer: dict = field(default_factory=dict)
    _pending: dict = field(default_factory=dict)
    _units_ended: int = 0

    def __post_init__(self):
        progress = self.tmp / "progress.json"
        if self.resume and progress.is_file():
            state = json.loads(progress.read_text())
            if state["options"] != self.options:
                raise CheckpointError(f"the unfinished run in {self.tmp} was started with other options "
                                      f"({state['options']}): rerun without --resume to start again")
            self.done, self.shards, self.state = state["done"], state["shards"], state.get("state", {})
            for s in self.shards:
                if not (self.tmp / s["file"]).is_file():
                    raise CheckpointError(f"{self.tmp / s['file']} is missing: rerun without --resume")
            return
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self._save_progress()

    def _save_progress(self):
        state = dict(options=self.options, done=self.done, shards=self.shards, state=self.state)
        part = self.tmp / "progress.json.partial"
        part.write_text(json.dumps(state))
        os.replace(part, self.tmp / "progress.json")

    def add(self, key: str, tensor: torch.Tensor):
        self._buffer[key] = tensor.detach().to("cpu").contiguous()

    def end_unit(self, unit: str, info):
        self._pending[unit] = info
        if sum(t.numel() * t.element_size() for t in self._buffer.values()) >= self.max_shard_bytes:
            self.flush()
        self._units_ended += 1
        # tests: a real signal mid-run, "N" (SIGKILL after N units) or "N:INT" (SIGINT, as Ctrl-C sends)
        after, _, sig = os.environ.get("_MOLAE_TEST_SIGNAL_AFTER_UNITS", "").partition(":")
        if after and self._units_ended == int(after):
            os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))

    def flush(self):
        """Write the buffer as shards of at most max_shard_bytes (a larger tensor gets a shard of its
        own), then record the ended units as done: one progress update for all of them."""
        while self._buffer:
            chunk, size = {}, 0
            for k in list(self._buffer):
                t = self._buffer[k]
                if chunk and size + t.numel() * t.element_size() > self.max_shard_bytes:
                    break
                chunk[k] = self._buffer.pop(k)
                size += t.numel() * t.element_size()
            self._write_shard(chunk)
        self.flushes += 1
        old = dict(self.state)
        if self.before_progress is not None and self._pending:
            self.state.update(self.before_progress())
        self.done.update(self._pending)
        self._pending = {}
        self._save_progress()
        for key in ("carry",):  # a file the new progress no longer names
            if old.get(key) and old[key] != self.state.get(key):
                (self.tmp / old[key]).unlink(missing_ok=True)

    def _write_shard(self, tensors: dict):
        name = f"shard-{len(self.shards) + 1:05d}.safetensors"
        part = self.tmp / (name + ".partial")
        try:
            save_file(tensors, str(part), metadata={"format": "pt"})
        except OSError as e:
            if e.errno == errno.ENOSPC or "No space" in str(e):
                raise ResumableError(f"no space left on the device of {self.tmp}: free space, then rerun "
                                     "with --resume (the same command; the finished part is kept there)") from e
            raise
        os.replace(part, self.tmp / name)
        self.shards.append(dict(file=name, keys=sorted(tensors)))

    def finish(self) -> dict[str, str]:
        """Flush, give the shards their final names, write the index; returns the weight map."""
        self.flush()
        n = len(self.shards)
        weight_map, total = {}, 0
        for i, s in enumerate(self.shards, 1):
            final = SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / s["file"], self.tmp / final)
            total += (self.tmp / final).stat().st_size
            weight_map.update({k: final for k in s["keys"]})
        if n > 1:
            index = dict(metadata=dict(total_size=total), weight_map=dict(sorted(weight_map.items())))
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "progress.json").unlink()
        return weight_map


def write_text_atomically(path: Path, text: str):
    """Text written beside `path` and renamed onto it: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".partial")
    part.write_text(text)
    part.replace(path)


def write_json_atomically(path: Path, data):
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def temp_dir_for(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.molae-partial"


def _taken(dst: Path) -> bool:
    """dst exists and is more than an empty directory."""
    return dst.exists() and not (dst.is_dir() and not any(dst.iterdir()))


def check_destination(dst: Path, overwrite: bool):
    if _taken(dst) and not overwrite:
        raise CheckpointError(f"{dst} exists and is not empty: choose another --out or pass --overwrite")


def check_disk_space(dst: Path, needed: int):
    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    if free < needed:
        raise CheckpointError(f"not enough disk space at {dst.parent}: need about {human_bytes(needed)}, "
                              f"{human_bytes(free)} free; free space or choose another --out")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextmanager
def deferred_interrupt():
    """Ctrl-C (SIGINT) inside the block takes effect at its end, as KeyboardInterrupt: what the block writes and
    the record of it stay one step (a checkpoint renamed into place and the step that says so). Outside the main
    thread, where no handler can be set, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = signal.signal(signal.SIGINT, lambda *_: got.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt


@contextmanager
def removed_on_error(tmp: Path, resumable: bool = True):
    """Delete the partial output when the run fails for good. A resumable run keeps it when it is
    interrupted (re-raised as `Interrupted`, naming the directory and how to continue or remove it)
    or fails in a way --resume can continue from (a full disk)."""
    try:
        yield
    except ResumableError:
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except KeyboardInterrupt:
        if not resumable or not tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        raise Interrupted(f"the finished part ({human_bytes(_size(tmp))}) is kept in {tmp}: rerun the same "
                          f"command with --resume to continue, or delete that directory") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, dst: Path, overwrite: bool):
    """Move the finished temporary directory to dst (replacing it only with overwrite; an empty
    directory is replaced in any case)."""
    if dst.exists():
        if _taken(dst) and not overwrite:
            raise CheckpointError(f"{dst} exists and is not empty: choose another --out or pass --overwrite")
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(tmp, dst)
