"""Benchmarks: one file each, each declaring its own `molae bench` subcommands.

    convert.py   `molae bench convert`: real-sized synthetic checkpoints (`synthetic_checkpoint`, exact shapes,
                 random values) converted by `molae convert` in a child process; wall time, peak memory
    quality.py   `molae bench quality` / `quality-report`: every MoLAE variant and peer method at several
                 budgets on one model, scored on the same held-out windows
    layer.py     `molae bench layer` / `layer-report`: MoLAE experts against standard MoE kernels, timed side
                 by side in one run (and `matmul_rate`, the one matmul-peak measurement)
    ep.py        `molae bench ep`: expert parallelism on K local processes, standard EP against MoLAE's
                 latent dispatch (step time, the forward's phases, bytes sent against the formula)
    generate.py  `molae bench generate`: a whole model (a real model's shapes, a few layers, or a checkpoint)
                 generating text with transformers' generate, original against MoLAE: prefill, decode, memory

Adding a benchmark: a file here with the measurement and an `add_commands(bench)` that declares its
subcommands through `molae.command.add_command` (outputs and devices checked before any work), and its
name in BENCHMARKS. Results go to results/ as JSON plus markdown with the command, device, date and commit.
"""

from __future__ import annotations

import importlib

BENCHMARKS = ("convert", "quality", "layer", "ep", "generate")


def add_commands(bench) -> None:
    """Every benchmark's subcommands, on the `molae bench` subparsers."""
    for name in BENCHMARKS:
        importlib.import_module(f"{__name__}.{name}").add_commands(bench)


def __getattr__(name: str):
    """`molae.bench.synthetic_checkpoint` and the other names of bench/convert.py, imported when first used."""
    if name.startswith("__"):
        raise AttributeError(name)
    convert = importlib.import_module(f"{__name__}.convert")
    try:
        return getattr(convert, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
