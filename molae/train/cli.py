"""`molae train` / `python -m molae.train`: the arguments and the command."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..command import Parser, declare, fraction_list, positive_float, positive_int, run_command
from .config import PRESETS, TrainConfig, apply_overrides, load_config
from .loop import train


def add_train_args(p: argparse.ArgumentParser):
    p.add_argument("--config", required=True, help=f"a preset ({', '.join(PRESETS)}) or a TrainConfig JSON file")
    p.add_argument("--data", required=True, type=Path, help="a directory made by `molae data prepare`")
    p.add_argument("--out", required=True, type=Path,
                   help="run directory (log, checkpoint, final model): new or empty, or a run to --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (a larger --steps extends it)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--steps", type=positive_int, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=positive_int, help="tokens per sequence")
    p.add_argument("--lr", type=positive_float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="seed of the initialisation and of the data order")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile each decoder layer")
    p.add_argument("--ep", type=positive_int, metavar="K",
                   help="expert parallelism: each MoE layer's experts split over K of the torchrun processes "
                        "(K divides their number; FSDP2 shards the rest over all of them)")
    p.add_argument("--upcycle-from", metavar="DENSE",
                   help="start the MoE from this trained dense model of the same family (directory or hub id): "
                        "fine-grained copies of its FFNs as experts, the rest copied (train/upcycle.py)")
    p.add_argument("--export-at", type=fraction_list, metavar="F,F",
                   help="also export the model at these fractions of the run, as OUT/model-step{N} (e.g. 0.25,0.5)")
    p.add_argument("--time-budget", type=positive_float, metavar="SECONDS",
                   help="set --steps from the step time measured in the first steps, to train about this long")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field, typed by the field: lr=1e-3, model.num_hidden_layers=4, "
                        "molae.groups=4, molae=null")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args) -> TrainConfig:
    cfg = apply_overrides(load_config(args.config), args.set)
    flags = dict(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
                 lr=args.lr, seed=args.seed, compile=args.compile, time_budget_s=args.time_budget, ep=args.ep,
                 export_at=args.export_at)
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if args.upcycle_from is not None:  # the preset's recipe (or the default one) from this dense model
        cfg = replace(cfg, upcycle={**(cfg.upcycle or {}), "from": args.upcycle_from})
    return cfg


def cmd_train(args):
    cfg = config_from_args(args)
    summary = train(cfg, args.data, args.out, resume=args.resume, device=args.device, progress=not args.no_progress)
    if summary is not None:
        print(f"final validation loss {summary['final_val_loss']:.4f} after {summary['tokens']:,} tokens; "
              f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {100 * summary['mfu']:.1f}%; model saved to "
              f"{Path(args.out) / 'model'}")


def main(argv=None) -> int:
    p = Parser(prog="python -m molae.train", description="pretrain an MoE / MoLAE model (one process or torchrun)")
    add_train_args(p)
    declare(p, cmd_train, name="molae train", outputs={"out": "run-dir"}, devices=("device",))
    return run_command(p.parse_args(argv))
