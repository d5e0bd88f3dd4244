"""Fixtures the test files share: the real command run in this process, and a small prepared corpus."""

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from molae import data as D
from molae.cli import main

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys):
    """`molae.cli.main` in this process: the same code path as the command, without a new
    interpreter's start-up for each bad-input case."""
    def call(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return call


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A prepared directory of two standard-library packages, 512-token BPE."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    D.prepare([STDLIB / "json", STDLIB / "email"], out, vocab_size=512, val_fraction=0.3, tokenizer_bytes=0,
              progress=False)
    return out
