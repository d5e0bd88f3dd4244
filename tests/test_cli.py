"""Every subcommand meets bad input and interruptions the same way (molae/command.py): one line on
stderr naming the problem and the fix, exit 2, nothing written; an interruption exits 130 and says
what was kept and how to continue. Through the real command where it can be, through a seam
(a signal at a chosen point, a disk that reports itself full) where it cannot."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

import molae
from conftest import Result
from molae.convert import ConvertOptions, convert_checkpoint
from molae.data import byte_tokenizer, prepare
from tiny import tiny_model

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def cli(*args, env=None, timeout=300):
    """The real console entry point in a fresh process."""
    return subprocess.run([sys.executable, "-m", "molae.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def one_line(result, command, *phrases, status=2):
    """The exit status, no traceback, and the message on the last line of stderr (progress may precede it);
    `result` is what conftest's `run` or subprocess returns (returncode, stderr)."""
    code, err = result.returncode, result.stderr
    assert code == status, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"molae {command}: "), last
    for p in phrases:
        assert p in last, last
    return last


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny Qwen2-MoE over bytes (vocabulary 256) with its byte tokenizer, as `molae demo` saves one."""
    path = tmp_path_factory.mktemp("models") / "moe"
    tiny_model("qwen2_moe", dtype=torch.float32, vocab_size=256, max_position_embeddings=64).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(byte_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "molae"
    convert_checkpoint(byte_model, path, ConvertOptions(latent_dim=8))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared directory with a 512-token BPE: a larger vocabulary than the byte model's."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare([STDLIB / "json", STDLIB / "email"], out, vocab_size=512, val_fraction=0.3, progress=False)
    return out


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"molae {molae.__version__}"


def truncated_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return dst


def test_eval_and_heal_on_a_truncated_checkpoint(byte_model, converted, tmp_path, run):
    bad = truncated_copy(byte_model, tmp_path / "bad")
    one_line(run("eval", bad, "--text", __file__), "eval", "is truncated or corrupt", "download it again")
    one_line(run("heal", converted, "--teacher", bad, "--data", __file__, "--tokens", 64, "--seq-len", 16,
                  "--batch-size", 2), "heal", "is truncated or corrupt")
    one_line(run("heal", truncated_copy(converted, tmp_path / "bad-molae"), "--teacher", byte_model, "--data",
                  __file__, "--tokens", 64, "--seq-len", 16, "--batch-size", 2), "heal", "is truncated or corrupt")


def test_convert_of_a_converted_model(converted, tmp_path, run):
    one_line(run("convert", converted, "--out", tmp_path / "o"), "convert", "is a MoLAE checkpoint already",
             "molae decompress")
    one_line(run("analyze", converted), "analyze", "is a MoLAE checkpoint already")
    assert not (tmp_path / "o").exists()


def test_heal_takes_text_and_refuses_a_vocabulary_the_model_lacks(byte_model, converted, prepared, tmp_path, run):
    import shutil

    dst = tmp_path / "molae"
    shutil.copytree(converted, dst)
    before = (dst / "model.safetensors").read_bytes()
    one_line(run("heal", dst, "--teacher", byte_model, "--data", prepared, "--tokens", 256, "--seq-len", 32),
             "heal", "512-token vocabulary, the model has 256", "pass text files")
    assert (dst / "model.safetensors").read_bytes() == before
    r = run("heal", dst, "--teacher", byte_model, "--data", STDLIB / "json", "--tokens", 512, "--seq-len", 32,
            "--batch-size", 4)
    assert r.returncode == 0, r.stderr
    healed = json.loads((dst / "heal.json").read_text())
    assert healed["steps"] == 4 and healed["tokens"] == 512 and healed["data"] == str(STDLIB / "json")
    one_line(run("convert", byte_model, "--out", tmp_path / "c", "--calibration", prepared), "convert",
             "--calibration", "512-token vocabulary")


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "train"
    prepare([STDLIB / "json", STDLIB / "email", STDLIB / "http"], out, vocab_size=512, val_fraction=0.3,
            tokenizer_bytes=0, progress=False)
    return out


TINY = ["--config", "demo", "--set", "model.num_hidden_layers=1", "--set", "model.hidden_size=32",
        "--set", "model.num_attention_heads=2", "--set", "model.num_key_value_heads=2", "--seq-len", "32",
        "--batch-size", "2", "--no-progress"]


@pytest.mark.parametrize("args,phrases", [
    (["--steps", "-1"], ["argument --steps: -1 is not a positive integer"]),
    (["--set", "lr=abc"], ["--set lr=abc:", "lr takes a number"]),
    (["--set", "steps=1.5"], ["--set steps=1.5:", "steps takes a whole number"]),
    (["--set", "steps=0"], ["--set steps=0:", "steps=0 (allowed >= 1)"]),
    (["--set", "betas=[0.9]"], ["betas takes a list of 2 numbers"]),
    (["--set", "compile=maybe"], ["compile takes true or false"]),
    (["--set", "model.num_hidden_layers=abc"], ["model.num_hidden_layers takes a whole number"]),
    (["--set", "molae.groups=two"], ["molae.groups takes a whole number"]),
    (["--set", "molae.width=3"], ["molae section has unknown keys ['width']"]),
    (["--set", "dtype=fp8"], ["dtype='fp8' (allowed auto, bfloat16, float16, float32)"]),
    (["--lr", "0"], ["argument --lr: 0 is not a positive number"]),
])
def test_train_values_are_typed_and_checked_before_anything_is_written(train_data, tmp_path, run, args, phrases):
    one_line(run("train", *TINY, "--data", train_data, "--out", tmp_path / "o", *args), "train", *phrases)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU exists")
def test_devices_that_are_not_here(train_data, byte_model, tmp_path, run):
    one_line(run("train", *TINY, "--data", train_data, "--out", tmp_path / "o", "--device", "cuda"), "train",
             "--device cuda: no CUDA GPU is available here; pass --device cpu")
    one_line(run("eval", byte_model, "--text", __file__, "--device", "tpu"), "eval", "is not a device")
    for bench in (["convert", "--model", "deepseek-v3-layer", "--workdir", tmp_path / "w"],
                  ["quality", "--model", byte_model, "--name", "x", "--data", train_data, "--workdir", tmp_path / "w",
                   "--json", tmp_path / "q.json"],
                  ["layer", "--out", tmp_path / "r"]):
        one_line(run("bench", *bench), f"bench {bench[0]}", "--device cuda (the default): no CUDA GPU",
                 "pass --device cpu")
    assert not list(tmp_path.iterdir())  # no empty workdir, results or run directory left


def test_bench_layer_errors_name_the_command(tmp_path, run):
    one_line(run("bench", "layer", "--device", "cpu", "--shape", "1,2", "--out", tmp_path), "bench layer",
             "1,2")
    one_line(run("bench", "layer", "--impls", "moe,fast"), "bench layer", "--impls", "names ['fast']")


def commands_with_outputs(byte_model, converted, train_data, target):
    """Every subcommand that writes, with `target` as the output it writes."""
    text = ["--text", str(Path(__file__))]
    return {
        "convert --out": ["convert", byte_model, "--out", target],
        "convert --report": ["convert", byte_model, "--out", target.parent.parent / "ok", "--report", target],
        "decompress": ["decompress", converted, "--out", target],
        "data prepare": ["data", "prepare", STDLIB / "json", "--out", target],
        "data bigram --json": ["data", "bigram", train_data, "--json", target],
        "demo": ["demo", "--out", target],
        "analyze": ["analyze", byte_model, "--out", target],
        "train": ["train", *TINY, "--data", train_data, "--out", target],
        "eval --json": ["eval", byte_model, *text, "--json", target],
        "bench quality --json": ["bench", "quality", "--model", byte_model, "--name", "x", "--data", train_data,
                                 "--workdir", target.parent.parent / "w", "--json", target, "--device", "cpu"],
        "bench quality --workdir": ["bench", "quality", "--model", byte_model, "--name", "x", "--data", train_data,
                                    "--workdir", target, "--json", target.parent.parent / "q.json", "--device", "cpu"],
        "bench layer --out": ["bench", "layer", "--device", "cpu", "--out", target],
    }


@pytest.mark.parametrize("name", ["convert --out", "convert --report", "decompress", "data prepare",
                                  "data bigram --json", "demo", "analyze", "train", "eval --json",
                                  "bench quality --json", "bench quality --workdir", "bench layer --out"])
def test_an_unwritable_output_fails_before_any_work_and_names_the_users_path(byte_model, converted, train_data,
                                                                          tmp_path, run, name):
    """Tests run as root, for whom a read-only directory is writable: the output's parent is a file."""
    (tmp_path / "file").write_text("not a directory")
    target = tmp_path / "file" / "out"
    args = commands_with_outputs(byte_model, converted, train_data, target)[name]
    t0 = time.perf_counter()
    result = run(*args)
    last = one_line(result, name.split(" --")[0], str(target), "is a file, not a directory", "choose another")
    assert "molae-partial" not in last
    assert time.perf_counter() - t0 < 20  # before the work (the demo alone would take minutes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("command", ["analyze", "train", "demo", "convert", "data prepare"])
def test_an_existing_non_empty_output_directory_is_refused(byte_model, train_data, tmp_path, run, command):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    args = {"analyze": ["analyze", byte_model], "train": ["train", *TINY, "--data", train_data],
            "demo": ["demo"], "convert": ["convert", byte_model], "data prepare": ["data", "prepare", STDLIB / "json"]}
    one_line(run(*args[command], "--out", out), command, f"--out {out} exists and is not empty",
             "--resume" if command == "train" else "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"


def test_an_existing_empty_output_directory_is_used(byte_model, tmp_path, run):
    for sub in ("c", "a"):
        (tmp_path / sub).mkdir()
    assert run("convert", byte_model, "--out", tmp_path / "c", "--latent-dim", 8).returncode == 0
    assert (tmp_path / "c" / "config.json").is_file()
    assert run("analyze", byte_model, "--out", tmp_path / "a").returncode == 0
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"analysis.json", "energy_vs_d.png", "spectra.png",
                                                            "groups.png", "ranks.png"}


def test_ctrl_c_during_convert_keeps_the_finished_layers_and_says_how_to_resume(byte_model, tmp_path):
    args = ["convert", byte_model, "--latent-dim", 8, "--max-shard-size", "1KB"]
    r = cli(*args, "--out", tmp_path / "o", env={"_MOLAE_TEST_SIGNAL_AFTER_UNITS": "1:INT"})
    partial = tmp_path / ".o.molae-partial"
    last = one_line(r, "convert", "interrupted", str(partial), "--resume", "or delete",
                    status=130)
    assert "kB" in last and partial.is_dir() and not (tmp_path / "o").exists()
    r = cli(*args, "--out", tmp_path / "o", "--resume")
    assert r.returncode == 0, r.stderr
    assert cli(*args, "--out", tmp_path / "ref").returncode == 0
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # the interruption fell between shards
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == files
    for f in files:
        assert (tmp_path / "o" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_ctrl_c_during_heal_and_analyze_leaves_nothing(byte_model, converted, tmp_path):
    import shutil

    dst = tmp_path / "molae"
    shutil.copytree(converted, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    r = cli("heal", dst, "--teacher", byte_model, "--data", __file__, "--tokens", 64, "--seq-len", 16,
            "--batch-size", 2, env={"_MOLAE_TEST_SIGNAL_AFTER_UNITS": "3:INT"})  # while writing the result
    one_line(r, "heal", "interrupted: nothing was written", status=130)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["molae"]


def train_until(args, out: Path, step: int):
    proc = subprocess.Popen([sys.executable, "-m", "molae.cli", "train", *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "log.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and any(json.loads(x).get("step", 0) >= step and "loss" in x
                                for x in log.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return Result(proc.returncode, "", err)


def test_ctrl_c_inside_a_deferred_block_takes_effect_at_its_end():
    """The trainer saves a checkpoint and records its step inside deferred_interrupt: a SIGINT between the two
    (the race that had the interrupted message name the step before the one on disk) waits for the block."""
    from molae.checkpoint import deferred_interrupt

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C, mid-block
            done.append("renamed")
            done.append("recorded")
    assert done == ["renamed", "recorded"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler restored
    with deferred_interrupt():  # no signal: nothing raised
        done.append("again")
    assert done[-1] == "again"


def test_ctrl_c_during_train_keeps_the_checkpoint_or_nothing(train_data, tmp_path):
    args = [*TINY, "--data", train_data, "--set", "log_every=1", "--set", "eval_every=400"]
    result = train_until([*args, "--steps", 400, "--set", "ckpt_every=2"], tmp_path / "run", 3)
    last = one_line(result, "train", "interrupted", str(tmp_path / "run" / "checkpoint.pt"), "--resume",
                    status=130)
    step = int(last.split("holds step ")[1].split(":")[0])
    assert step >= 2 and torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == step
    r = cli("train", *args, "--steps", 400, "--set", "ckpt_every=2", "--out", tmp_path / "run")
    one_line(r, "train", "is not empty", "--resume")
    r = cli("train", *args, "--steps", step + 2, "--set", "ckpt_every=2", "--out", tmp_path / "run", "--resume")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["tokens"] == (step + 2) * 2 * 32
    result = train_until([*args, "--steps", 400, "--set", "ckpt_every=1000"], tmp_path / "early", 1)
    one_line(result, "train", "interrupted: nothing was written", status=130)
    assert not (tmp_path / "early").exists()
    (tmp_path / "given").mkdir()  # a directory that was there: left as it was, --export-at's models too
    result = train_until([*args, "--steps", 400, "--set", "ckpt_every=1000", "--export-at", "0.01"],
                         tmp_path / "given", 6)
    one_line(result, "train", "interrupted: nothing was written", status=130)
    assert list((tmp_path / "given").iterdir()) == []


def test_disk_too_small_says_sizes_people_read(byte_model, tmp_path, monkeypatch, run):
    import shutil

    import molae.checkpoint as ck

    real = shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    last = one_line(run("convert", byte_model, "--out", tmp_path / "o"), "convert", "not enough disk space")
    size = (byte_model / "model.safetensors").stat().st_size
    assert f"need about {size / 1e3:.1f} kB" in last or f"need about {(size + 2**20) / 1e6:.1f} MB" in last, last
    assert "10 B free" in last and not (tmp_path / "o").exists()


def test_eval_text_and_context_checks(byte_model, tmp_path, run):
    one_line(run("eval", byte_model, "--text", tmp_path), "eval", f"{tmp_path} is a directory",
             "pass a UTF-8 text file")
    one_line(run("eval", byte_model, "--text", __file__, "--context", 100000), "eval",
             "--context 100000 is longer than the model's 64 positions", "pass --context 64 or less")
    one_line(run("eval", byte_model, "--text", __file__, "--context", 32, "--stride", 32), "eval",
             "stride=32 is out of range")


def test_empty_lists_are_refused(byte_model, tmp_path, run):
    one_line(run("convert", byte_model, "--out", tmp_path / "o", "--projections", ","), "convert",
             "--projections", "names no projection", "gate, up, down")
    one_line(run("analyze", byte_model, "--projections", "up,up"), "analyze", "is not valid")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="names no projection"):
        convert_checkpoint(byte_model, tmp_path / "o", ConvertOptions(projections=()))


def test_progress_is_a_plain_line_per_interval_when_not_a_terminal():
    code = ("import time; from molae.command import progress_bar\n"
            "bar = progress_bar(range(50), desc='work', mininterval=0.05)\n"
            "for i in bar: time.sleep(0.01); bar.set_postfix(i=i)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "\r" not in r.stderr and 2 <= len(lines) <= 20, r.stderr
    assert lines[-1].startswith("work: 100%") and all(x.startswith("work:") for x in lines)
