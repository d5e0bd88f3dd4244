"""The `molae` command line: one subcommand per plain function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_demo(args):
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(steps=args.steps, seed=args.seed, val_windows=args.val_windows)
    run_demo(cfg, out=args.out, overwrite=args.overwrite)


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molae", description="Mixture of Latent Experts (MoLAE) tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a tiny MoE on the Python standard library, convert it, compare",
                          description="Train a tiny Qwen2-MoE on the standard library's source (whole modules held "
                                      "out), convert it to MoLAE at several latent sizes and with per-expert SVD "
                                      "of equal size, and print validation bits per byte of each.")
    demo.add_argument("--steps", type=positive_int, default=600, help="training steps (default 600)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--val-windows", type=positive_int, default=96,
                      help="256-byte windows of held-out code to evaluate on (default 96)")
    demo.add_argument("--out", type=Path, default=None,
                      help="directory for the trained model, results.json, results.md and a plot")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"molae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"molae {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
