"""[11] The table of a scripts/gpu/profile_train.sh run: python scripts/gpu/profile_report.py DIR --commit C --date D
DIR holds one folder per preset (summary.json, log.jsonl, profile.txt); writes DIR/profile.{json,md}. Per preset:
tokens/s and MFU as the trainer logged them, the device and host time per step from torch.profiler's totals over
the profiled steps, and how busy that leaves the GPU (device time per step over the wall time per step)."""

import argparse
import json
import re
from pathlib import Path


def read(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    text = (run / "profile.txt").read_text()
    steps = int(re.search(r"\((\d+) steps\)", text).group(1))
    ms = {k: float(v) * {"ms": 1, "us": 1e-3, "s": 1e3}[u]
          for k, v, u in re.findall(r"Self (CPU|CUDA) time total: ([\d.]+)(ms|us|s)\b", text)}
    c = s["config"]
    tokens_per_step = c["batch_size"] * c["seq_len"] * c["grad_accum"] * s.get("world", 1)
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"tokens_per_s"' in x]
    wall_ms = 1e3 * tokens_per_step / s["tokens_per_s"] if s["tokens_per_s"] else None  # None: no full log window
    return dict(preset=run.name, tokens_per_s=s["tokens_per_s"], mfu=s["mfu"], peak_memory_gb=s.get("peak_memory_gb"),
                tokens_per_step=tokens_per_step, wall_ms_per_step=wall_ms, final_val_loss=s["final_val_loss"],
                gpu_ms_per_step=ms["CUDA"] / steps if "CUDA" in ms else None,  # None: a CPU run
                cpu_ms_per_step_profiled=ms["CPU"] / steps,
                gpu_busy=ms["CUDA"] / steps / wall_ms if "CUDA" in ms and wall_ms else None,
                includes_compilation=len(logged) < 2)  # one log line: its rate counts the compiling steps


def fmt(v, spec: str, scale: float = 1.0) -> str:
    return "" if v is None else format(v * scale, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--date", required=True)
    ap.add_argument("--device", default="NVIDIA H200")
    ap.add_argument("--command", default="COMMIT=<sha> bash scripts/gpu/profile_train.sh")
    a = ap.parse_args()
    runs = sorted(r for r in a.dir.iterdir() if (r / "profile.txt").exists() and (r / "summary.json").exists())
    rows = [read(r) for r in runs]
    meta = dict(command=a.command, device=a.device, date=a.date, commit=a.commit)
    (a.dir / "profile.json").write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")
    md = ["# Where a training step's time goes ([11])", "",
          f"- command: `{a.command}`; device {a.device}; date {a.date}; commit `{a.commit}`",
          "- 40 steps per preset, steps 11-15 under torch.profiler (its CPU times include its own overhead); "
          "tokens/s as the trainer logged it; GPU busy = profiled device time per step / wall time per step.", "",
          "| preset | tokens/step | tokens/s | MFU | wall ms/step | GPU ms/step | host ms/step (profiled) | GPU busy "
          "| peak GB | val loss at 40 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        star = " (incl. compilation)" if r["includes_compilation"] else ""
        cells = [r["preset"], f"{r['tokens_per_step']:,}", fmt(r["tokens_per_s"], ",.0f") + star,
                 fmt(r["mfu"], ".1f", 100) + "%" * (r["mfu"] is not None),
                 "" if star else fmt(r["wall_ms_per_step"], ".1f"),
                 fmt(r["gpu_ms_per_step"], ".1f"), fmt(r["cpu_ms_per_step_profiled"], ".1f"),
                 "" if star or r["gpu_busy"] is None else fmt(r["gpu_busy"], ".0f", 100) + "%",
                 fmt(r["peak_memory_gb"], ".1f"), fmt(r["final_val_loss"], ".4f")]
        md.append("| " + " | ".join(cells) + " |")
    (a.dir / "profile.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
