"""Text data on every machine: Python's own standard library source, as bytes.

Split rule (deterministic, recorded in results): a file belongs to the validation split when
crc32 of its top-level module name (first path part under the stdlib root, `.py` dropped) is
0 mod `VAL_MODULUS`; so whole modules and packages are held out and no file is in both
splits. Test suites (`test`, `tests`, `idle_test` folders) and site-packages are left out.
Tokens are bytes: the vocabulary is the 256 byte values, and token id == byte value.
"""

from __future__ import annotations

import hashlib
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VAL_MODULUS = 10
SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
SEPARATOR = b"\n\n"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_of(path: Path, root: Path) -> str:
    first = path.relative_to(root).parts[0]
    return first[:-3] if first.endswith(".py") else first


def is_validation(module: str) -> bool:
    return zlib.crc32(module.encode()) % VAL_MODULUS == 0


def python_files(root: Path) -> list[Path]:
    """Sorted *.py files under root, without test suites and installed packages."""
    files = [p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts[:-1])]
    return sorted(files)


@dataclass
class Corpus:
    train: np.ndarray  # uint8 bytes
    val: np.ndarray
    manifest: dict


def load_stdlib_corpus(root: Path | None = None) -> Corpus:
    """Train and validation byte arrays from the standard library, split by module."""
    root = Path(root) if root else stdlib_root()
    files = python_files(root)
    if not files:
        raise FileNotFoundError(f"no Python files under {root}: pass a directory of .py files")
    split = {"train": [], "val": []}
    for p in files:
        split["val" if is_validation(module_of(p, root)) else "train"].append(p)
    if not split["train"] or not split["val"]:
        raise ValueError(f"the split of {root} left one side empty: need more top-level modules")
    arrays, digest = {}, hashlib.sha256()
    for name, paths in split.items():
        blob = SEPARATOR.join(p.read_bytes() for p in paths)
        arrays[name] = np.frombuffer(blob, dtype=np.uint8)
        for p in paths:
            digest.update(f"{name}:{p.relative_to(root)}\n".encode())
    manifest = dict(
        root=str(root),
        split_rule=f"validation iff crc32(top-level module name) % {VAL_MODULUS} == 0",
        files={k: len(v) for k, v in split.items()},
        bytes={k: int(v.size) for k, v in arrays.items()},
        val_modules=sorted({module_of(p, root) for p in split["val"]}),
        file_list_sha256=digest.hexdigest(),
    )
    return Corpus(arrays["train"], arrays["val"], manifest)


def random_batch(data: np.ndarray, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq + 1] int64 windows at random offsets (inputs and next-token targets)."""
    starts = torch.randint(0, data.size - seq - 1, (batch,), generator=gen)
    return torch.stack([torch.from_numpy(data[s:s + seq + 1].astype(np.int64)) for s in starts.tolist()])


def eval_windows(data: np.ndarray, seq: int, max_windows: int) -> torch.Tensor:
    """[W, seq + 1] non-overlapping windows spread evenly over data: the same every run."""
    n = (data.size - 1) // seq
    if n < 1:
        raise ValueError(f"validation data has {data.size} bytes: need at least {seq + 1}")
    idx = np.linspace(0, n - 1, min(n, max_windows)).astype(np.int64) * seq
    return torch.stack([torch.from_numpy(data[s:s + seq + 1].astype(np.int64)) for s in idx])


def byte_tokenizer():
    """A transformers fast tokenizer whose ids are the UTF-8 byte values (vocabulary 256). The NUL
    byte (id 0), absent from text, doubles as end-of-text (tools such as lm-eval need one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=bytes_to_unicode()[0])
