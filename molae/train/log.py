"""A run's log: log.jsonl, stdout through the progress bar, TensorBoard where installed."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    """The records of a run's log.jsonl (or any JSON-lines file), in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Logger:
    """Process 0 only: stdout (through tqdm), log.jsonl, and TensorBoard when it is installed."""

    def __init__(self, out: Path, main: bool, resume_step: int | None):
        self.main, self.path, self.tb = main, out / "log.jsonl", None
        if not main:
            return
        if resume_step is not None and self.path.exists():  # drop what the lost interval logged
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            part = self.path.with_name("log.jsonl.partial")
            part.write_text("".join(k + "\n" for k in keep))
            os.replace(part, self.path)
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step)
        except ImportError:
            self.tb = None

    def log(self, record: dict, bar=None):
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(k, v, record["step"])
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        (bar.write if bar is not None else print)(text)

    def close(self):
        if self.tb is not None:
            self.tb.close()
