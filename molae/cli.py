"""The `molae` command line: one subcommand per plain function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .methods import METHODS
from .command import (Parser, add_command, existing_path, fraction, group_choices, non_negative_float,
                      non_negative_int, positive_float, positive_int, projection_list, run_command, text_file)


def cmd_demo(args):
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(steps=args.steps, seed=args.seed, val_windows=args.val_windows)
    run_demo(cfg, out=args.out, overwrite=args.overwrite)


def cmd_data_prepare(args):
    from .data import prepare

    m = prepare(args.sources, args.out, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                patterns=tuple(args.pattern or ["*.py"]), text_field=args.text_field,
                tokenizer_bytes=args.tokenizer_bytes, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"{args.out}: train {m['tokens']['train']:,} tokens ({m['files']['train']} files, {m['bytes']['train']:,} "
          f"bytes), validation {m['tokens']['val']:,} tokens ({m['files']['val']} files); vocabulary "
          f"{m['vocab_size']}; file list sha256 {m['file_list_sha256'][:16]}; {m['seconds']} s")


def cmd_data_bigram(args):
    from .data import TokenData, bigram_loss

    td = TokenData(args.data)
    r = dict(data=str(args.data), file_list_sha256=td.manifest.get("file_list_sha256"),
             **bigram_loss(td.train, td.val, td.vocab_size))
    print(f"validation loss (nats/token): bigram {r['bigram_loss']:.4f} (lambda {r['bigram_lambda']}), "
          f"unigram {r['unigram_loss']:.4f}, over {r['val_tokens']:,} tokens")
    if args.json:
        from .checkpoint import write_json_atomically
        write_json_atomically(args.json, r)


def cmd_train(args):
    from .train import cmd_train as run

    run(args)


def cmd_convert(args):
    from .convert import ConvertOptions, convert_checkpoint, format_summary

    projections = args.projections or (("up", "gate") if args.method == "molae" else ("gate", "up", "down"))
    opts = ConvertOptions(latent_dim=args.latent_dim, rank_ratio=args.rank_ratio, groups=args.groups,
                          projections=projections, layers=args.layers,
                          dtype=args.dtype, device=args.device, max_shard_size=args.max_shard_size,
                          method=args.method, budget=args.budget, calibration=args.calibration,
                          calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len,
                          calib_seed=args.calib_seed, calib_batch=args.calib_batch, carry=args.carry,
                          heal_steps=args.heal_steps, heal_lr=args.heal_lr, group_by=args.group_by,
                          group_choices=args.group_choices, error_power=args.error_power, damp=args.damp,
                          mobe_steps=args.mobe_steps)
    summary = convert_checkpoint(args.src, args.out, opts, report=args.report, resume=args.resume,
                                 overwrite=args.overwrite)
    print(format_summary(summary))
    print(f"wrote {args.out}" + (f" and {args.report}" if args.report else ""))


def cmd_heal(args):
    from .heal import heal

    s = heal(args.dst, args.teacher, args.data, args.tokens, args.seq_len, args.batch_size, args.lr,
             device=args.device, seed=args.seed)
    what = "factors" if s["trained"] == "latent factors" else "experts"
    verdict = f"healed {what} written" if s["applied"] else f"held-out KL did not fall: converted {what} kept"
    print(f"{args.dst}: {s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.0f} s; held-out KL "
          f"{s['held_out_kl_before']:.5f} -> {s['held_out_kl_after']:.5f} nats/token; {verdict}")


def cmd_decompress(args):
    from .convert import decompress_checkpoint

    info = decompress_checkpoint(args.src, args.out, dtype=args.dtype, device=args.device,
                                 max_shard_size=args.max_shard_size, resume=args.resume, overwrite=args.overwrite)
    print(f"multiplied out {info['layers_decompressed']} MoLAE layers; wrote {args.out}")


def cmd_eval(args):
    from .checkpoint import write_json_atomically
    from .evaluate import check_context, efficiency, eval_text, format_eval, load, measure_speed, read_text
    from .models import find_experts

    tasks = [t for t in (args.tasks or "").split(",") if t]
    if not args.text and not tasks:
        raise ValueError("nothing to evaluate: pass --text FILE (e.g. ../shared/data/wikitext-2/test.txt) "
                         "and/or --tasks LIST")
    for path in args.text or []:  # bad text files fail before the model is loaded
        read_text(path)
    model, tokenizer = load(args.model, args.device, args.dtype)
    check_context(model, args.context, args.stride)
    result = dict(model=args.model, texts=[eval_text(model, tokenizer, path, args.context, args.stride,
                                                     args.batch_size) for path in args.text or []])
    if tasks:
        from .tasks import run_tasks

        result["tasks"] = run_tasks(model, tokenizer, tasks, args.data_dir, args.limit, args.batch_size,
                                    args.num_fewshot, args.device)
    result["efficiency"] = efficiency(model) if find_experts(model) else None
    result["speed"] = measure_speed(model) or None
    print(format_eval(result))
    if args.json:
        write_json_atomically(args.json, result)


def cmd_analyze(args):
    from .analyze import analyze_checkpoint, format_analysis

    result = analyze_checkpoint(args.model, args.out, args.projections, args.layers, args.device,
                                overwrite=args.overwrite)
    print(format_analysis(result))
    if args.out:
        print(f"wrote analysis.json, energy_vs_d.png, spectra.png, groups.png and ranks.png under {args.out}")


def add_checkpoint_output(p: argparse.ArgumentParser):
    """The options of the streaming checkpoint writer that convert and decompress share."""
    p.add_argument("--out", required=True, type=Path, help="destination directory (new or empty)")
    p.add_argument("--max-shard-size", default="2GB", help="output shard size, e.g. 2GB (default), 500MB")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def build_parser() -> argparse.ArgumentParser:
    from .layers import KINDS

    parser = Parser(prog="molae", description="Mixture of Latent Experts (MoLAE) tools.")
    parser.add_argument("--version", action="version", version=f"molae {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    dtypes = ["auto", "bfloat16", "float16", "float32"]

    demo = add_command(sub, "demo", cmd_demo, outputs={"out": "dir"},
                       help="train a tiny MoE on the Python standard library, convert it, compare",
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

    data = sub.add_parser("data", help="training data").add_subparsers(dest="data", required=True, metavar="COMMAND")
    prep = add_command(data, "prepare", cmd_data_prepare, outputs={"out": "dir"},
                       help="collect text, split by package, train a BPE tokenizer, tokenize",
                       description="Collect files (default *.py; .txt and .jsonl too) from files and directories, "
                                   "split them by package into train/validation (a recorded crc32 rule), train a "
                                   "byte-level BPE tokenizer on the training split only, and write memory-mappable "
                                   "token arrays and a manifest.")
    prep.add_argument("sources", nargs="+", type=existing_path, help="files and directories to collect from")
    prep.add_argument("--out", required=True, type=Path, help="output directory (new or empty)")
    prep.add_argument("--vocab-size", type=positive_int, default=16384, help="BPE vocabulary size (default 16384)")
    prep.add_argument("--val-fraction", type=fraction, default=0.05,
                      help="share of split keys (packages) held out for validation (default 0.05)")
    prep.add_argument("--pattern", action="append", help="file pattern in directories, repeatable (default *.py)")
    prep.add_argument("--text-field", default="text", help="the text field of .jsonl records (default text)")
    prep.add_argument("--tokenizer-bytes", type=non_negative_int, default=64 * 2**20,
                      help="train the tokenizer on this many bytes of training text (default 64 MiB; 0 = all)")
    prep.add_argument("--tokenizer", type=existing_path, default=None,
                      help="use this saved tokenizer directory instead of training one")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    bg = add_command(data, "bigram", cmd_data_bigram, outputs={"json": "file"},
                     help="validation loss of a bigram model counted on the training split",
                     description="The floor a language model trained on a prepared directory must clearly beat: "
                                 "an interpolated bigram model (lambda chosen on validation) and a unigram model.")
    bg.add_argument("data", type=Path, help="a directory made by molae data prepare")
    bg.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")

    from .train import add_train_args

    tr = add_command(sub, "train", cmd_train, outputs={"out": "run-dir"}, devices=("device",),
                     help="pretrain an MoE / MoLAE / LatentMoE model (torchrun -m molae.train for FSDP2)",
                     description="Train a transformers MoE family (qwen2_moe, mixtral, deepseek_v3, ...) with "
                                 "standard, MoLAE or LatentMoE experts on a prepared data directory. bf16 autocast, "
                                 "AdamW, warmup + cosine, clipping, accumulation, router balancing, atomic "
                                 "checkpoints (--resume). Several GPUs: torchrun --nproc-per-node K -m molae.train.")
    add_train_args(tr)

    conv = add_command(sub, "convert", cmd_convert, outputs={"out": "dir", "report": "file"}, devices=("device",),
                       help="convert a Hugging Face MoE checkpoint to MoLAE (streaming)",
                       description="Convert a Hugging Face MoE checkpoint (local directory or hub id) into a "
                                   "MoLAE checkpoint loadable with AutoModelForCausalLM after `import molae`. "
                                   "Reads one layer at a time; the output appears only when complete.")
    conv.add_argument("src", help="source checkpoint: a local directory or a hub id")
    add_checkpoint_output(conv)
    conv.add_argument("--latent-dim", type=positive_int, default=None,
                      help="latent size d for every factorized projection (default: m, capped at n)")
    conv.add_argument("--rank-ratio", type=float, default=None,
                      help="step 1: keep ceil(R*min(m, n)) of each expert matrix's rank first (0 < R <= 1)")
    conv.add_argument("--groups", type=positive_int, default=1, help="expert groups G sharing a latent (default 1)")
    conv.add_argument("--projections", type=projection_list, default=None,
                      help="factorized projections: up,gate[,down] (default up,gate; baselines: gate,up,down)")
    conv.add_argument("--layers", default=None, help="MoE layers to convert: all (default), or e.g. 0-3,7,20-")
    conv.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda")
    conv.add_argument("--dtype", default="auto", choices=dtypes,
                      help="dtype of the new expert tensors (default auto: the source's); others are copied as they are")
    conv.add_argument("--report", type=Path, default=None, help="write the per-layer report as JSON here")
    conv.add_argument("--method", default="molae", choices=list(METHODS),
                      help="molae (default), or a baseline: svd (per expert), d2moe, mobe, hcsmoe (merging), "
                           "prune-frequency, prune-reap")
    conv.add_argument("--budget", type=float, default=None,
                      help="keep this fraction of the routed-expert parameters (0-1); MoLAE: latent sizes per "
                           "layer and projection chosen for the least total (whitened) error")
    conv.add_argument("--calibration", default=None,
                      help="text file, directory of text files or prepared data directory: activation-aware "
                           "factorization (and the data the baselines score experts on)")
    conv.add_argument("--calib-tokens", type=positive_int, default=65536, help="calibration tokens (default 65536)")
    conv.add_argument("--calib-seq-len", type=positive_int, default=512, help="calibration window length (default 512)")
    conv.add_argument("--calib-seed", type=int, default=0,
                      help="which windows of a prepared --calibration directory (default 0; another seed: another "
                           "sample)")
    conv.add_argument("--calib-batch", type=positive_int, default=8,
                      help="calibration windows per forward pass of a layer (default 8)")
    conv.add_argument("--calib-carry", dest="carry", default="original", choices=["original", "converted"],
                      help="what each layer's calibration sees: the original model's hidden states (default), or "
                           "the converted earlier layers' outputs")
    conv.add_argument("--heal-steps", type=non_negative_int, default=0,
                      help="layer-wise healing: Adam steps per converted layer, fitting its original's outputs on "
                           "its calibration inputs (default 0: none; molae heal is the whole-model pass)")
    conv.add_argument("--heal-lr", type=positive_float, default=1e-3, help="layer-wise healing learning rate "
                      "(default 1e-3)")
    conv.add_argument("--group-by", default="index", choices=["index", "similarity", "routing"],
                      help="experts of a group: by index (default), by similar row spaces, or the router's own "
                           "groups (routing: G = DeepSeek-V2/V3's n_group, so a token touches at most topk_group)")
    conv.add_argument("--group-choices", type=group_choices, default=None, metavar="G,G,...",
                      help="with --budget: choose G per layer among these (divisors of E; E: one latent per "
                           "expert, SVD-LLM's form) with the d's, for the least error (e.g. 1,4,E)")
    conv.add_argument("--error-power", type=non_negative_float, default=1.0, metavar="P",
                      help="with --budget: weigh each layer and projection's error by its energy to the power -P "
                           "(default 1: relative error; 0.5 was better on one CPU reference and slightly worse on "
                           "the other, results/error_power/)")
    conv.add_argument("--damp", type=non_negative_float, default=0.01,
                      help="ridge added to calibration Gram matrices, relative to their mean diagonal (default 0.01)")
    conv.add_argument("--mobe-steps", type=positive_int, default=30000,
                      help="MoBE: Adam steps per layer and kind (default 30000, its authors')")

    hl = add_command(sub, "heal", cmd_heal, outputs={"dst": "writable"}, devices=("device",),
                     help="distil a converted model towards its original (what the conversion stores)",
                     description="Train what molae convert stored (a MoLAE checkpoint's latent factors; a peer "
                                 "method's routed experts, merged ones tied) on KL(teacher || student) over "
                                 "next-token distributions; the checkpoint is rewritten in place, atomically.")
    hl.add_argument("dst", type=Path, help="a checkpoint written by molae convert, any --method (rewritten)")
    hl.add_argument("--teacher", required=True, help="the model it was converted from")
    hl.add_argument("--data", required=True, type=existing_path,
                    help="training text: a text file, a directory of text files (tokenized with the model's own "
                         "tokenizer), or a directory made by molae data prepare with the model's vocabulary")
    hl.add_argument("--tokens", required=True, type=positive_int, help="training tokens")
    hl.add_argument("--seq-len", type=positive_int, default=512, help="window length (default 512)")
    hl.add_argument("--batch-size", type=positive_int, default=8, help="windows per step (default 8)")
    hl.add_argument("--lr", type=positive_float, default=1e-4, help="peak learning rate (default 1e-4)")
    hl.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    hl.add_argument("--device", default="cpu", help="cpu (default) or cuda")

    dec = add_command(sub, "decompress", cmd_decompress, outputs={"out": "dir"}, devices=("device",),
                      help="multiply a MoLAE checkpoint out into the original architecture",
                      description="Write a checkpoint of the base architecture (experts as A @ B, in the "
                                  "source's on-disk layout) that any engine serving the base model can load.")
    dec.add_argument("src", help="a MoLAE checkpoint written by molae convert")
    add_checkpoint_output(dec)
    dec.add_argument("--device", default="cpu", help="where the products run: cpu (default) or cuda")
    dec.add_argument("--dtype", default="auto", choices=dtypes,
                     help="dtype of the expert weights written (default auto: the factors' dtype)")

    ev = add_command(sub, "eval", cmd_eval, outputs={"json": "file"}, devices=("device",),
                     help="perplexity on text files and an efficiency report",
                     description="Perplexity (sliding windows), bits per byte and, for MoE/MoLAE models, "
                                 "parameters, FLOPs and all-to-all bytes per token.")
    ev.add_argument("model", help="a model directory or hub id (MoE or MoLAE)")
    ev.add_argument("--text", type=text_file, action="append", help="UTF-8 text file to score (repeatable)")
    ev.add_argument("--context", type=positive_int, default=None,
                    help="window length in tokens (default: the model's, at most 4096)")
    ev.add_argument("--stride", type=positive_int, default=None,
                    help="tokens scored per window, at most context-1 (default context-1)")
    ev.add_argument("--tasks", default=None,
                    help="comma list of lm-eval tasks; offline: gsm8k_local, gsm8k_mc_local (with --data-dir)")
    ev.add_argument("--data-dir", type=existing_path, default=None,
                    help="local data for the offline tasks (DIR/gsm8k/*.jsonl)")
    ev.add_argument("--limit", type=positive_int, default=None, help="at most N examples per task")
    ev.add_argument("--num-fewshot", type=non_negative_int, default=None, help="few-shot examples (default: each task's)")
    ev.add_argument("--batch-size", type=positive_int, default=8, help="windows / requests per forward pass (default 8)")
    ev.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ev.add_argument("--dtype", default="auto", choices=dtypes, help="weights dtype (default auto: as saved)")
    ev.add_argument("--json", type=Path, default=None, help="write every figure here as JSON")

    an = add_command(sub, "analyze", cmd_analyze, outputs={"out": "dir"}, devices=("device",),
                     help="redundancy in a MoE checkpoint's experts: spectra, ranks, shared latents",
                     description="Per MoE layer and projection: expert spectra and effective ranks, energy kept by "
                                 "a shared latent as a function of d (several G), and overlap of experts' row "
                                 "spaces. Streams the weights; JSON and plots with --out.")
    an.add_argument("model", help="a MoE checkpoint directory or hub id")
    an.add_argument("--out", type=Path, default=None, help="write analysis.json and PNG plots here (new or empty)")
    an.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    an.add_argument("--projections", type=projection_list, default=KINDS, help="kinds to analyze (default gate,up,down)")
    an.add_argument("--layers", default=None, help="MoE layers: all (default), or e.g. 0-3,7")
    an.add_argument("--device", default="cpu", help="cpu (default) or cuda")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True, metavar="COMMAND")
    from .bench import add_commands as add_bench_commands

    add_bench_commands(bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
