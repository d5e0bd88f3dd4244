"""Text data on every machine: Python's own standard library source, as bytes.

Split rule (deterministic, recorded in results): a file belongs to the validation split when
crc32 of its top-level module name (first path part under the stdlib root, `.py` dropped) is
0 mod `VAL_MODULUS`; so whole modules and packages are held out and no file is in both
splits. Test suites (`test`, `tests`, `idle_test` folders) and site-packages are left out.
Tokens are bytes: the vocabulary is the 256 byte values, and token id == byte value.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sysconfig
import time
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


# ----------------------------------------------------------------------------- `molae data prepare`
#
# A prepared directory holds train.bin and val.bin (token ids, uint16 when the vocabulary fits,
# else uint32, one end-of-text token after each document), tokenizer/ (a transformers fast
# tokenizer, byte-level BPE trained on the training split only), files.tsv (every file: split,
# split key, bytes, tokens, source, path) and manifest.json (sources, split rule, counts, hashes).

EOT = "<|endoftext|>"
SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", "node_modules"}
PREPARED_FILES = ("train.bin", "val.bin", "manifest.json")


def split_key(rel: Path) -> str:
    """The unit that goes wholly to one split: the first two directory levels of the file's path
    under its source (`numpy/linalg/x.py` -> numpy/linalg; `numpy/x.py` -> numpy; `six.py` -> six)."""
    dirs = rel.parts[:-1]
    return "/".join(dirs[:2]) if dirs else rel.stem


def in_validation(key: str, val_fraction: float) -> bool:
    return zlib.crc32(key.encode()) % 1_000_000 < round(val_fraction * 1_000_000)


def split_rule(val_fraction: float) -> str:
    return (f"validation iff crc32(key) % 1000000 < {round(val_fraction * 1_000_000)}, key = the first two directory "
            "levels of the file's path under its source (the file's stem when it has none); files with the same "
            "content as an earlier file (sources in order, paths sorted) are dropped")


def collect_files(sources: list[str | Path], patterns: tuple[str, ...] = ("*.py",)) -> list[tuple[int, Path, Path]]:
    """(source index, absolute path, path relative to its source) of every matching file, in a fixed
    order: sources as given, paths sorted. A source that is a file is taken whatever its name."""
    out = []
    for i, src in enumerate(map(Path, sources)):
        if not src.exists():
            raise FileNotFoundError(f"source {src} does not exist: pass existing files or directories")
        if src.is_file():
            out.append((i, src, Path(src.name)))
            continue
        found = set()
        for pattern in patterns:
            found.update(p for p in src.rglob(pattern) if p.is_file()
                         and not SKIP_DIRS & set(p.relative_to(src).parts[:-1]))
        out += [(i, p, p.relative_to(src)) for p in sorted(found)]
    return out


def documents(path: Path, text_field: str = "text") -> list[str] | None:
    """The documents in one file: a .jsonl file's `text_field` values, else the whole file as UTF-8
    text. None when the file is not valid UTF-8 (counted and skipped by `prepare`)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    if path.suffix != ".jsonl":
        return [raw] if raw.strip() else []
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{n} has no string field {text_field!r}: pass --text-field NAME")
            docs.append(record[text_field])
    return docs


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenization) with EOT as id 0, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)


def prepare(sources, out, vocab_size: int = 16384, val_fraction: float = 0.05, patterns=("*.py",),
            text_field: str = "text", tokenizer_bytes: int = 64 * 2**20, tokenizer=None,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Collect, split, train a tokenizer on the training split, tokenize; see the module notes.

    tokenizer_bytes: the tokenizer is trained on training documents taken in crc32(path) order up
    to this many bytes (0: all of them). tokenizer: a saved tokenizer directory to use instead.
    Writes into a temporary directory beside `out` and renames it at the end.
    """
    from .command import progress_bar
    from transformers import AutoTokenizer

    from .checkpoint import check_destination, publish, temp_dir_for

    out = Path(out)
    check_destination(out, overwrite)
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} is not in (0, 1): pass e.g. 0.05")
    if not 256 < vocab_size <= 2**32:
        raise ValueError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs more than 256")
    t0 = time.time()
    files = collect_files(sources, tuple(patterns))
    if not files:
        raise FileNotFoundError(f"no files matching {', '.join(patterns)} under {', '.join(map(str, sources))}: "
                                "check the paths or pass --pattern")
    seen, rows, docs = set(), [], {"train": [], "val": []}
    skipped = dict(undecodable=0, duplicate=0, empty=0)
    list_hash = hashlib.sha256()
    for i, path, rel in progress_bar(files, desc="read", unit="file", disable=not progress):
        content = path.read_bytes()
        digest = hashlib.sha1(content).hexdigest()
        if digest in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(digest)
        texts = documents(path, text_field)
        if texts is None or not texts:
            skipped["undecodable" if texts is None else "empty"] += 1
            continue
        key = split_key(rel)
        split = "val" if in_validation(key, val_fraction) else "train"
        docs[split].append((path, texts, len(rows)))
        rows.append([split, key, len(content), 0, i, str(rel)])
        list_hash.update(f"{i}\t{rel}\t{digest}\n".encode())
    if not docs["train"] or not docs["val"]:
        raise ValueError(f"the split left {'training' if not docs['train'] else 'validation'} empty "
                         f"({len(rows)} files): give more files or change --val-fraction")

    tmp = temp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if tokenizer is None:
            sample, size = [], 0
            for path, texts, _ in sorted(docs["train"], key=lambda d: zlib.crc32(str(d[0]).encode())):
                sample += texts
                size += sum(len(t) for t in texts)
                if tokenizer_bytes and size >= tokenizer_bytes:
                    break
            print(f"training a {vocab_size}-token BPE on {size / 1e6:.1f} MB of training text", flush=True)
            tok = train_tokenizer(sample, vocab_size)
            del sample
        else:
            tok = AutoTokenizer.from_pretrained(str(tokenizer))
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer} has no end-of-text token: molae needs one between documents")
        tok.save_pretrained(tmp / "tokenizer")
        V = len(tok)
        dtype = np.uint16 if V <= 2**16 else np.uint32
        backend, eot = tok.backend_tokenizer, tok.eos_token_id
        counts = {}
        for split in ("train", "val"):
            with open(tmp / f"{split}.bin", "wb") as f:
                n = 0
                bar = progress_bar(total=len(docs[split]), desc=f"tokenize {split}", unit="file", disable=not progress)
                for j in range(0, len(docs[split]), 256):  # batches of files, encoded in parallel
                    part = docs[split][j:j + 256]
                    enc = iter(backend.encode_batch([t for _, texts, _ in part for t in texts], add_special_tokens=False))
                    for _, texts, row in part:
                        ids = [x for _ in texts for x in (*next(enc).ids, eot)]  # EOT after each document
                        np.asarray(ids, dtype=dtype).tofile(f)
                        rows[row][3] = len(ids)
                        n += len(ids)
                    bar.update(len(part))
                bar.close()
                counts[split] = n
        with open(tmp / "files.tsv", "w") as f:
            f.write("split\tkey\tbytes\ttokens\tsource\tpath\n")
            f.writelines("\t".join(map(str, r)) + "\n" for r in rows)
        tok_hash = hashlib.sha256((tmp / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
        manifest = dict(
            sources=[str(Path(s).resolve()) for s in sources], patterns=list(patterns), split_rule=split_rule(val_fraction),
            val_fraction=val_fraction, files={s: sum(r[0] == s for r in rows) for s in ("train", "val")},
            bytes={s: sum(r[2] for r in rows if r[0] == s) for s in ("train", "val")}, tokens=counts,
            skipped=skipped, dtype=np.dtype(dtype).name, vocab_size=V, eot_id=eot,
            tokenizer_trained_on_bytes=None if tokenizer else size, tokenizer_source=str(tokenizer) if tokenizer else None,
            tokenizer_sha256=tok_hash, file_list_sha256=list_hash.hexdigest(), seconds=round(time.time() - t0, 1))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


class TokenData:
    """A prepared directory, memory-mapped. Batches are a pure function of (seed, step, index), so
    the data position of a run is its step: resuming at step s reads exactly what s would have."""

    def __init__(self, path):
        path = Path(path)
        missing = [f for f in PREPARED_FILES if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{path} is not a prepared data directory (no {', '.join(missing)}): "
                                    "make one with `molae data prepare SOURCES --out DIR`")
        self.path = path
        self.manifest = json.loads((path / "manifest.json").read_text())
        dtype = np.dtype(self.manifest["dtype"])
        self.train = np.memmap(path / "train.bin", dtype=dtype, mode="r")
        self.val = np.memmap(path / "val.bin", dtype=dtype, mode="r")
        self.vocab_size = self.manifest["vocab_size"]

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))

    def batch(self, seed: int, step: int, index: int, batch_size: int, seq_len: int) -> torch.Tensor:
        """[batch_size, seq_len + 1] int64 training windows at random offsets; `index` numbers the
        micro-batches of one optimizer step across processes (micro * world + rank)."""
        if self.train.size <= seq_len + 1:
            raise ValueError(f"{self.path} has {self.train.size} training tokens: need more than {seq_len + 1}")
        rng = np.random.default_rng([seed, step, index])
        starts = rng.integers(0, self.train.size - seq_len - 1, size=batch_size)
        return torch.from_numpy(np.stack([self.train[s:s + seq_len + 1] for s in starts]).astype(np.int64))

    def val_windows(self, seq_len: int, max_tokens: int) -> torch.Tensor:
        """[W, seq_len + 1] non-overlapping validation windows spread evenly, W*seq_len <= max_tokens."""
        return eval_windows(self.val, seq_len, max(1, max_tokens // seq_len))

    def check_vocabulary(self, model_vocab: int, flag: str):
        """Token ids must index the model's embedding: a directory prepared with another tokenizer fails."""
        if self.vocab_size > model_vocab:
            raise ValueError(f"{flag} {self.path} was prepared with a {self.vocab_size}-token vocabulary, the model "
                             f"has {model_vocab}: pass text files instead (tokenized with the model's own tokenizer), "
                             "or a directory prepared with `molae data prepare --tokenizer MODEL_DIR`")


TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")


def text_files(source: Path, flag: str) -> list[Path]:
    """A text file, or the text files (TEXT_SUFFIXES) under a directory, sorted."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ValueError(f"{flag} {source} does not exist: pass a text file, a directory of text files or a "
                         "prepared data directory")
    files = sorted(p for p in source.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{flag} {source} holds no text files ({', '.join(TEXT_SUFFIXES)}): pass another directory")
    return files


def tokenize_files(files: list[Path], tokenizer, max_tokens: int) -> list[int]:
    """Token ids of the files in order, concatenated, until at least max_tokens (or the files end)."""
    ids: list[int] = []
    for f in files:
        ids += tokenizer(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            break
    return ids


class TextTokens(TokenData):
    """Text files tokenized with a model's own tokenizer, held in memory; batches as TokenData's."""

    def __init__(self, source, tokenizer, max_tokens: int, flag: str = "--data"):
        self.path = Path(source)
        self.manifest = dict(source=str(source), tokenizer=getattr(tokenizer, "name_or_path", None))
        ids = tokenize_files(text_files(source, flag), tokenizer, max_tokens)
        self.train = np.asarray(ids, dtype=np.int64)
        self.vocab_size = len(tokenizer)
        self._tokenizer = tokenizer

    def tokenizer(self):
        return self._tokenizer


class CorpusTokens(TokenData):
    """A byte corpus (load_stdlib_corpus) as training data: token ids are the bytes (byte_tokenizer),
    held in memory; batches and validation windows as TokenData's. What `molae demo` trains on."""

    def __init__(self, corpus: Corpus):
        self.path = Path(corpus.manifest["root"])
        self.manifest = dict(corpus.manifest, tokenizer="bytes", vocab_size=256)
        self.train, self.val, self.vocab_size = corpus.train, corpus.val, 256

    def tokenizer(self):
        return byte_tokenizer()


def is_prepared(path) -> bool:
    return all((Path(path) / f).exists() for f in PREPARED_FILES)


def training_tokens(source, tokenizer, model_vocab: int, max_tokens: int, flag: str = "--data") -> TokenData:
    """What a command trains on: a prepared directory whose vocabulary fits the model (memory-mapped),
    or text (a file or a directory of text files) tokenized with the model's `tokenizer` up to
    max_tokens."""
    if is_prepared(source):
        data = TokenData(source)
        data.check_vocabulary(model_vocab, flag)
        return data
    if tokenizer is None:
        raise ValueError(f"{flag} {source} is text, and the model has no tokenizer to read it with: pass a "
                         "directory made by `molae data prepare` in the model's vocabulary")
    return TextTokens(source, tokenizer, max_tokens, flag)

def bigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict:
    """Validation cross-entropy (nats/token) of an interpolated bigram model counted on `train`:
    p(b|a) = lam c(a,b)/c(a) + (1-lam) p(b), p the add-one unigram; lam the best of a grid on `val`
    (which flatters the bigram: a fair floor for 'clearly below a bigram model')."""
    V = vocab_size
    a, b = train[:-1].astype(np.int64), train[1:].astype(np.int64)
    pairs, pair_counts = np.unique(a * V + b, return_counts=True)
    uni = np.bincount(train.astype(np.int64), minlength=V).astype(np.float64)
    p_uni = (uni + 1) / (uni.sum() + V)
    ctx = np.bincount(a, minlength=V).astype(np.float64)
    va, vb = val[:-1].astype(np.int64), val[1:].astype(np.int64)
    code = va * V + vb
    pos = np.searchsorted(pairs, code).clip(0, len(pairs) - 1)
    c_ab = np.where(pairs[pos] == code, pair_counts[pos], 0).astype(np.float64)
    p_cond = np.divide(c_ab, ctx[va], out=np.zeros_like(c_ab), where=ctx[va] > 0)
    best = None
    for lam in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        loss = float(-np.log(lam * p_cond + (1 - lam) * p_uni[vb]).mean())
        if best is None or loss < best["loss"]:
            best = dict(loss=loss, lam=lam)
    unigram = float(-np.log(p_uni[vb]).mean())
    return dict(bigram_loss=best["loss"], bigram_lambda=best["lam"], unigram_loss=unigram, val_tokens=int(vb.size))
