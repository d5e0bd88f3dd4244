"""What every `molae` subcommand shares. A leaf module: it imports nothing else of molae.

A subcommand is declared with `add_command`: its function, and which of its arguments are outputs
and devices. `run_command` then checks, before any work:

  outputs  {dest: kind}, each writable; kind "dir": new or empty (a non-empty one only with
           --overwrite, which replaces it); "run-dir": new, empty, or continued with --resume;
           "file": replaced at the end; "resumable-file": new unless --resume (runs are appended);
           "writable": anything that can be written (a scratch or results directory, a checkpoint
           rewritten in place)
  devices  dests that name a device (cpu, cuda, cuda:1) that must exist here

and turns every expected failure into one line on stderr naming the problem and the fix, exit 2
(`ValueError` and its subclasses such as `UsageError` and checkpoint errors, `OSError`). An
interruption (Ctrl-C) exits 130 with one line: what was kept on purpose (`Interrupted`, raised by
the code that keeps resumable state, says where and how to continue or remove it), or that nothing
was written.

Also here: argument types that check paths and numbers at parse time, `progress` (tqdm on a
terminal, a plain line every 30 s when stderr is a file or a pipe), `human_bytes`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from tqdm.std import tqdm


class UsageError(ValueError):
    """An expected failure; the message is one line naming the problem and the fix."""


class Interrupted(Exception):
    """An interruption after which partial state was kept on purpose; the message says where it is
    and how to continue (--resume) or remove it."""


# ----------------------------------------------------------------------------- parsing


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (and a pointer to --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_command(sub, name: str, func, *, outputs: dict[str, str] | None = None, devices: tuple[str, ...] = (),
                **kwargs) -> Parser:
    """A subparser whose arguments `run_command` checks before calling `func(args)` (module notes)."""
    p = sub.add_parser(name, **kwargs)
    declare(p, func, outputs=outputs, devices=devices)
    return p


def declare(p: argparse.ArgumentParser, func, *, name: str | None = None, outputs: dict[str, str] | None = None,
            devices: tuple[str, ...] = ()):
    """Make `p` a command: `run_command` will check its outputs and devices, then call `func(args)`;
    errors are prefixed with `name` (default: the parser's prog, e.g. `molae convert`)."""
    bad = set((outputs or {}).values()) - {"dir", "run-dir", "file", "resumable-file", "writable"}
    if bad:
        raise ValueError(f"output kinds {sorted(bad)} are not known")
    p.set_defaults(func=func, command_name=name or p.prog, command_parser=p, command_outputs=dict(outputs or {}),
                   command_devices=tuple(devices))


def _whole(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not {what}") from None


def positive_int(text: str) -> int:
    if _whole(text, "a positive integer") <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return int(text)


def non_negative_int(text: str) -> int:
    if _whole(text, "a whole number") < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: allowed 0 or more")
    return int(text)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: allowed 0 or more")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range: allowed 0 < value < 1")
    return value


def existing_path(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


def named_file(what: str):
    """An argparse type for NAME=FILE, FILE an existing file (`what` names it in the error)."""
    def parse(text: str) -> tuple[str, Path]:
        name, sep, path = text.partition("=")
        if not sep or not name or not Path(path).expanduser().is_file():
            raise argparse.ArgumentTypeError(f"{text!r}: give NAME=FILE with FILE an existing {what}")
        return name, Path(path).expanduser()
    return parse


def text_file(text: str) -> Path:
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: pass a UTF-8 text file (repeat the flag for "
                                         "several files)")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} does not exist: pass a UTF-8 text file")
    return path


def comma_list(allowed: tuple[str, ...]):
    """A type for comma lists of names from `allowed`, at least one, no repeats."""
    def parse(text: str) -> tuple[str, ...]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if not items or bad or len(set(items)) != len(items):
            what = f"names {bad}" if bad else ("names nothing" if not items else "repeats a name")
            raise argparse.ArgumentTypeError(f"{text!r} {what}: allowed a comma list of {', '.join(allowed)}")
        return tuple(items)
    return parse


def float_list(text):
    try:
        values = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a comma list of numbers") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names no number: give a comma list, e.g. 0.5,0.25")
    return values


def fraction_list(text):
    values = float_list(text)
    if any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text} has a value outside 0 < value < 1: give fractions, e.g. 0.5,0.25")
    return values


def int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a comma list of integers") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text} has a value below 1: token counts are positive")
    return values


def group_choices(text: str) -> tuple:
    """--group-choices 1,4,E: whole numbers >= 1, or E (every expert its own group)."""
    out = []
    for v in text.split(","):
        v = v.strip()
        if v != "E" and not (v.isdigit() and int(v) >= 1):
            raise argparse.ArgumentTypeError(f"{text}: each choice is a whole number >= 1 or E")
        out.append(v if v == "E" else int(v))
    return tuple(out)


def projection_list(text):
    """A comma list of distinct projection kinds, at least one."""
    from .layers import check_projections

    try:
        kinds = check_projections(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not kinds:
        raise argparse.ArgumentTypeError(f"{text!r} names no projection: allowed a comma list of gate, up, down")
    return kinds


# ----------------------------------------------------------------------------- checks before work


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def check_writable(path: Path, flag: str) -> None:
    """`path` (which need not exist yet) can be created: its nearest existing ancestor is a
    directory in which a file can be made. Tried for real, since permissions say little to root."""
    path = Path(path)
    parent = path.parent if path.exists() else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a directory: choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".molae-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {parent} ({e.strerror}): choose another {flag}") from None


def check_output_dir(path: Path, flag: str = "--out", allowed: bool = False,
                     fix: str = "pass --overwrite to replace it") -> Path:
    """A directory output: new or empty (non-empty only where `allowed`), and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file: pass a directory path")
    if path.is_dir() and any(path.iterdir()) and not allowed:
        raise UsageError(f"{flag} {path} exists and is not empty: choose a new directory, or {fix}")
    check_writable(path, flag)
    return path


def check_output_file(path: Path, flag: str, resume: bool | None = None) -> Path:
    """A file output, written at the end: writable; with resume given (a results file that runs are
    appended to), an existing one is refused unless resume is true."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory: pass a file path")
    if resume is False and path.exists():
        raise UsageError(f"{flag} {path} exists: pass --resume to continue it, or choose another {flag}")
    check_writable(path, flag)
    return path


def check_device(name: str, flag: str = "--device", default: bool = False):
    """The torch.device `name` names, if this machine has it."""
    import torch

    said = f"{flag} {name}" + (" (the default)" if default else "")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"{flag} {name!r} is not a device: use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{said}: no CUDA GPU is available here; pass --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{said}: this machine has {torch.cuda.device_count()} CUDA GPU(s); pass --device cuda")
    elif device.type != "cpu":
        raise UsageError(f"{said}: molae runs on cpu or cuda; pass --device cpu")
    return device


def preflight(args: argparse.Namespace) -> None:
    """The checks `add_command` declared for this subcommand (module notes)."""
    parser = getattr(args, "command_parser", None)
    for dest in getattr(args, "command_devices", ()):
        value = getattr(args, dest)
        if value is not None:
            default = parser is not None and value == parser.get_default(dest)
            check_device(value, "--" + dest.replace("_", "-"), default=default)
    for dest, kind in getattr(args, "command_outputs", {}).items():
        value = getattr(args, dest)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if kind == "dir":
            check_output_dir(value, flag, getattr(args, "overwrite", False))
        elif kind == "run-dir":
            check_output_dir(value, flag, getattr(args, "resume", False), "pass --resume to continue the run in it")
        elif kind == "writable":
            check_writable(Path(value), flag)
        else:
            check_output_file(value, flag, getattr(args, "resume", False) if kind == "resumable-file" else None)


def run_command(args: argparse.Namespace, func=None) -> int:
    """Check, then run one subcommand's function: bad input is one line on stderr and exit status 2;
    an interruption one line and exit status 130."""
    name = getattr(args, "command_name", "molae")
    if not sys.stderr.isatty():
        _quiet_library_bars()
    try:
        preflight(args)
        (func or args.func)(args)
    except Interrupted as e:
        print(f"{name}: interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{name}: interrupted: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def error_record(e: BaseException, limit: int = 300) -> str:
    """An exception kept as a result (a benchmark row, a log record): its type and its message's first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:limit]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text += f": {e.filename}"
    return text or type(e).__name__


# ----------------------------------------------------------------------------- progress


def _quiet_library_bars():
    """transformers' and the hub's own progress bars (shard writing, downloads): off in logs."""
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging

        disable_progress_bars()
        logging.disable_progress_bar()
    except ImportError:
        pass


class _Lines:
    """A stream for tqdm when stderr is not a terminal: each refresh becomes one plain line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str):
        s = s.replace("\r", "").rstrip()
        if s:
            self.stream.write(s + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """tqdm: a live bar on a terminal; where stderr is a file or a pipe (logs, CI), a plain line at
    most every 30 s instead of a flood of carriage-return updates."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm as live

        return live(iterable, **kwargs)
    kwargs.setdefault("mininterval", 30.0)
    kwargs.setdefault("maxinterval", 1e9)
    kwargs.setdefault("file", _Lines(sys.stderr))
    kwargs.setdefault("ascii", True)
    return _LogBar(iterable, **kwargs)


class _LogBar(tqdm):
    """tqdm whose postfix and description updates wait for the next timed refresh (tqdm's own redraw
    at once, which in a log is one more line per step)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)


__all__ = ["UsageError", "Interrupted", "Parser", "add_command", "declare", "positive_int", "non_negative_int",
           "positive_float", "non_negative_float", "fraction", "existing_path",
           "text_file", "comma_list", "human_bytes", "check_writable", "check_output_dir", "check_output_file",
           "check_device", "preflight", "run_command", "progress_bar"]
