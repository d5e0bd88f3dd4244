"""`molae demo` end to end through the installed console script, and its bad-input handling."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from molae.data import load_stdlib_corpus


def molae(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "molae.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def unigram_bits(data: np.ndarray) -> float:
    p = np.bincount(data, minlength=256) / data.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = molae("demo", "--steps", 60, "--val-windows", 16, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_demo_trains_a_real_model_and_compares_variants(short_demo):
    out, proc = short_demo
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    original = rows[0]
    assert original["variant"] == "original MoE"
    # the trained model predicts held-out code better than the training bytes' unigram entropy
    assert original["val_bpb"] < unigram_bits(load_stdlib_corpus().train) - 0.5
    methods = [r["method"] for r in rows[1:]]
    assert methods == ["molae", "svd"] * (len(rows[1:]) // 2) and len(rows) >= 5
    for molae_row, svd_row in zip(rows[1::2], rows[2::2]):
        assert svd_row["expert_params"] <= molae_row["expert_params"] < original["expert_params"]
        assert svd_row["groups"] == result["config"]["train"]["model"]["num_experts"]
        for r in (molae_row, svd_row):
            assert math.isclose(r["delta_bpb"], r["val_bpb"] - original["val_bpb"], abs_tol=1e-12)
            assert r["total_params"] - r["expert_params"] == original["total_params"] - original["expert_params"]
    molae_rows = [r for r in rows if r["method"] == "molae"]  # smaller latent, larger weight error
    errors = [r["rel_error"] for r in sorted(molae_rows, key=lambda r: -r["latent_dim"])]
    assert errors == sorted(errors) and errors[0] > 0
    # the printed table is the saved one
    table = (out / "results.md").read_text()
    assert table.strip() in proc.stdout and table.count("\n") == len(rows) + 2
    assert (out / "bpb_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["corpus"]["files"]["val"] > 0 and not [p for p in out.parent.iterdir() if p.name != out.name]
    # trained by molae.train: its log and summary come with the demo's output
    losses = [loss for _, loss in result["train_loss"]]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["steps"] == 60 and not (out / "checkpoint.pt").exists()
    # one NLL: the trainer's last validation and the demo's score of the saved model are the same number
    assert math.isclose(summary["val_bits_per_byte"], original["val_bpb"], rel_tol=1e-5)


def test_demo_model_loads_with_plain_transformers(short_demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = short_demo
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    text = "def add(a, b):\n    return a + b\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == list(text.encode())
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss / math.log(2) < 8.0  # better than uniform over bytes
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 8


def test_demo_refuses_an_existing_output_directory(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = molae("demo", "--steps", 1, "--out", out)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "exists and is not empty" in proc.stderr
    assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_demo_rejects_bad_numbers():
    proc = molae("demo", "--steps", 0)
    assert proc.returncode == 2 and "--steps: 0 is not a positive integer" in proc.stderr


@pytest.mark.slow
def test_full_default_demo(tmp_path):
    """The README's main command with default settings (a few minutes on 2 CPU cores)."""
    proc = molae("demo", "--out", tmp_path / "full", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "full" / "results.json").read_text())["rows"]
    assert rows[0]["val_bpb"] < unigram_bits(load_stdlib_corpus().train) - 1.0
