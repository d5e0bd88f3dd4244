"""`molae convert` / `molae decompress` on tiny real checkpoints of every supported family,
saved with transformers' save_pretrained in both on-disk layouts."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import molae  # noqa: F401  (registers the molae_<family> model types)
from molae.checkpoint import CheckpointError
from molae.convert import ConvertOptions, convert_checkpoint, decompress_checkpoint
from molae.models import SUPPORTED
from tiny import FAMILIES, tiny_model

assert set(FAMILIES) == set(SUPPORTED)


def cli(*args, env=None):
    """The real console entry point in a fresh process."""
    return subprocess.run([sys.executable, "-m", "molae.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def save(model, path, fused=False, **kw):
    model.save_pretrained(path, save_original_format=not fused, **kw)
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_latent_conversion_reproduces_the_model(family, fused, tmp_path, ids):
    model = tiny_model(family, dtype=torch.float32)
    src = save(model, tmp_path / "src", fused=fused)
    n = model.config.hidden_size
    summary = convert_checkpoint(src, tmp_path / "molae",
                                 ConvertOptions(latent_dim=n, groups=2, projections=("up", "gate", "down")))
    assert max(r["rel_error"] for r in summary["layers"]) < 1e-5
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "molae").eval()
    assert type(converted).__name__ == f"Molae{type(model).__name__}"
    torch.testing.assert_close(logits(converted, ids), logits(model, ids))
    gen = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(converted.generate(ids[:, :4], **gen), model.generate(ids[:, :4], **gen))
    assert sum(t.numel() for t in converted.state_dict().values()) == summary["after"]["total"]

    decompress_checkpoint(tmp_path / "molae", tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert type(plain) is type(model)
    torch.testing.assert_close(logits(plain, ids), logits(converted, ids))
    # decompress writes the layout the source had: the same tensor names
    assert set(tensors(tmp_path / "plain")) == set(tensors(src))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_reduced_latent_report_matches_saved_tensors(family, tmp_path):
    model = tiny_model(family, dtype=torch.float32)
    src = save(model, tmp_path / "src")
    d, G = 6, 2
    summary = convert_checkpoint(src, tmp_path / "molae", ConvertOptions(latent_dim=d, groups=G),
                                 report=tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(summary))
    config = json.loads((tmp_path / "molae" / "config.json").read_text())
    assert config["model_type"] == f"molae_{family}"
    layers = config["molae"]["layers"]
    assert all(spec == {"latent": {"gate": d, "up": d}, "groups": G} for spec in layers.values())
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "molae")
    assert sum(t.numel() for t in converted.state_dict().values()) == summary["after"]["total"]
    saved_before, saved_after = tensors(src), tensors(tmp_path / "molae")
    assert summary["before"]["total"] == sum(t.numel() for t in saved_before.values())
    assert summary["after"]["total"] == sum(t.numel() for t in saved_after.values())
    # the error in the report is the one recomputed from the files
    for row in summary["layers"]:
        prefix = next(k.rsplit(".", 1)[0] for k in saved_after
                      if k.endswith(".experts.up_A") and f"layers.{row['layer']}." in k)
        if row["latent_dim"] is None:
            assert f"{prefix}.{row['kind']}_proj" in saved_after
            continue
        A, B = saved_after[f"{prefix}.{row['kind']}_A"].double(), saved_after[f"{prefix}.{row['kind']}_B"].double()
        assert A.shape[-1] == d and B.shape[0] == G
        W_hat = torch.bmm(A, B.repeat_interleave(A.shape[0] // G, 0))
        names = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3")}[row["kind"]]
        W = torch.stack([next(saved_before[f"{prefix}.{e}.{nm}.weight"] for nm in names
                              if f"{prefix}.{e}.{nm}.weight" in saved_before) for e in range(A.shape[0])]).double()
        rel = ((W - W_hat).norm() / W.norm()).item()
        assert math.isclose(row["rel_error"], rel, rel_tol=1e-4), (row, rel)
        assert 0 < row["energy_kept"] < 1 and row["params_after"] == A.numel() + B.numel()
    # everything but the experts is copied bit for bit
    experts = [k for k in saved_before if ".experts." in k]
    for k, t in saved_before.items():
        if k not in experts:
            assert torch.equal(saved_after[k].view(torch.uint8), t.view(torch.uint8)), k


def test_sharded_source_and_output(tmp_path, ids):
    model = tiny_model("qwen2_moe", dtype=torch.float32)
    src = save(model, tmp_path / "src", max_shard_size="40KB")
    assert len(list(src.glob("*.safetensors"))) > 2 and (src / "model.safetensors.index.json").is_file()
    convert_checkpoint(src, tmp_path / "molae",
                       ConvertOptions(latent_dim=32, projections=("up", "gate", "down"), max_shard_size="30KB"))
    out = tmp_path / "molae"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(list(out.glob("*.safetensors"))) > 1
    converted = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(converted, ids), logits(model, ids))


def test_layers_subset_keeps_the_other_layers_as_they_are(tmp_path, ids):
    model = tiny_model("mixtral", dtype=torch.float32)
    src = save(model, tmp_path / "src")
    summary = convert_checkpoint(src, tmp_path / "molae", ConvertOptions(latent_dim=8, layers="1"))
    assert {r["layer"] for r in summary["layers"]} == {1}
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "molae")
    assert type(converted.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert type(converted.model.layers[1].mlp.experts).__name__ == "Experts"
    saved = tensors(tmp_path / "molae")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in saved  # layer 0 untouched
    assert torch.isfinite(logits(converted, ids)).all()


def test_dtype_option_applies_to_the_new_expert_tensors(tmp_path):
    src = save(tiny_model("olmoe", dtype=torch.float32), tmp_path / "src")
    convert_checkpoint(src, tmp_path / "molae", ConvertOptions(latent_dim=8, dtype="bfloat16"))
    saved = tensors(tmp_path / "molae")
    assert {t.dtype for k, t in saved.items() if ".experts." in k} == {torch.bfloat16}
    assert {t.dtype for k, t in saved.items() if ".experts." not in k} == {torch.float32}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "molae") is not None


def test_resume_after_a_kill_gives_the_same_output(tmp_path):
    src = save(tiny_model("deepseek_v3", dtype=torch.float32), tmp_path / "src")
    args = ["convert", src, "--latent-dim", "8", "--max-shard-size", "1KB"]
    clean = cli(*args, "--out", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    killed = cli(*args, "--out", tmp_path / "resumed", env={"_MOLAE_TEST_SIGNAL_AFTER_UNITS": "2"})
    assert killed.returncode == -9  # SIGKILL in the middle
    assert not (tmp_path / "resumed").exists()
    partial = tmp_path / ".resumed.molae-partial"
    assert len(json.loads((partial / "progress.json").read_text())["done"]) == 2
    resumed = cli(*args, "--out", tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not partial.exists()
    files = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir()) and len(files) > 3
    for name in files:
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    other = cli(*args[:2], "--latent-dim", "6", "--max-shard-size", "1KB", "--out", tmp_path / "again",
                env={"_MOLAE_TEST_SIGNAL_AFTER_UNITS": "1"})
    assert other.returncode == -9
    mismatch = cli(*args, "--out", tmp_path / "again", "--resume")  # other options: refused
    assert mismatch.returncode == 2 and "started with other options" in mismatch.stderr


def test_tokenizer_and_generation_files_are_copied(tmp_path):
    from molae.data import byte_tokenizer

    src = save(tiny_model("qwen3_moe", dtype=torch.float32), tmp_path / "src")
    byte_tokenizer().save_pretrained(src)
    convert_checkpoint(src, tmp_path / "molae", ConvertOptions(latent_dim=8))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "molae" / name).read_bytes() == (src / name).read_bytes()


# ----------------------------------------------------------------------------- bad input


def one_line_error(proc, *phrases):
    """Exit code 2, no traceback, and the error on the last line of stderr (progress bars may precede it)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("molae convert: error: ") or err.startswith("molae decompress: error: "), err
    for p in phrases:
        assert p in err, err


@pytest.fixture(scope="module")
def mixtral_src(tmp_path_factory):
    return save(tiny_model("mixtral", dtype=torch.float32), tmp_path_factory.mktemp("src") / "mixtral")


@pytest.mark.parametrize("args,phrases", [
    (["--latent-dim", "0"], ["--latent-dim: 0 is not a positive integer"]),
    (["--latent-dim", "33"], ["latent_dim=33 is out of range", "min(160, 32) = 32"]),
    (["--groups", "3"], ["groups=3 does not divide n_experts=4"]),
    (["--rank-ratio", "1.5"], ["--rank-ratio 1.5 is out of range"]),
    (["--projections", "up,side"], ["projections=['up', 'side'] is not valid"]),
    (["--layers", "5"], ["--layers '5' names layers without MoE experts", "the MoE layers are 0-1"]),
])
def test_bad_arguments(mixtral_src, tmp_path, run, args, phrases):
    proc = run("convert", mixtral_src, "--out", tmp_path / "out", *args)
    one_line_error(proc, *phrases)
    assert not list(tmp_path.iterdir())  # nothing left behind, not even a partial directory


def test_bad_sources(mixtral_src, tmp_path, run):
    one_line_error(run("convert", tmp_path / "nope", "--out", tmp_path / "o"), "does not exist")
    one_line_error(cli("convert", "no-such-org/no-such-model", "--out", tmp_path / "o", env={"HF_HUB_OFFLINE": "1"}),
                   "could not be downloaded from the hub", "pass a local checkpoint directory")
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM, LlamaConfig, LlamaForCausalLM

    small = dict(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=16)
    LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(tmp_path / "llama")
    one_line_error(run("convert", tmp_path / "llama", "--out", tmp_path / "o"),
                   "is a dense llama model with no MoE experts", "qwen2_moe")
    GraniteMoeForCausalLM(GraniteMoeConfig(**small, num_local_experts=4)).save_pretrained(tmp_path / "granite")
    one_line_error(run("convert", tmp_path / "granite", "--out", tmp_path / "o"),
                   "model type 'granitemoe' is not supported", "mixtral")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_shard(mixtral_src, tmp_path, run, damage):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(mixtral_src, src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{garbage" + data[16:])
    one_line_error(run("convert", src, "--out", tmp_path / "o"), "is truncated or corrupt", "download it again")
    assert not (tmp_path / "o").exists()


def test_non_finite_weights(tmp_path, run):
    model = tiny_model("qwen2_moe", dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj[2, 0, 0] = float("nan")
    src = save(model, tmp_path / "src")
    proc = run("convert", src, "--out", tmp_path / "o", "--max-shard-size", "1KB")
    one_line_error(proc, "layer 1", "NaN/Inf", "allowed finite weights only")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_existing_destination_needs_overwrite(mixtral_src, tmp_path, run):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    one_line_error(run("convert", mixtral_src, "--out", tmp_path / "o"), "exists", "--overwrite")
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep"
    ok = run("convert", mixtral_src, "--out", tmp_path / "o", "--overwrite", "--latent-dim", "8")
    assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "o" / "mine.txt").exists() and (tmp_path / "o" / "config.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU exists")
def test_device_without_a_gpu(mixtral_src, tmp_path, run):
    one_line_error(run("convert", mixtral_src, "--out", tmp_path / "o", "--device", "cuda"), "no CUDA GPU")
    run("convert", mixtral_src, "--out", tmp_path / "l", "--latent-dim", "8")
    one_line_error(run("decompress", tmp_path / "l", "--out", tmp_path / "p", "--device", "cuda"), "no CUDA GPU")
    one_line_error(run("decompress", tmp_path / "l", "--out", tmp_path / "p", "--device", "tpu9"), "is not a device")
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_decompress_refuses_a_plain_checkpoint(mixtral_src, tmp_path, run):
    one_line_error(run("decompress", mixtral_src, "--out", tmp_path / "o"), "is not a MoLAE checkpoint")


def test_disk_full(mixtral_src, tmp_path, monkeypatch):
    """A full disk cannot be made here: the free-space check and the ENOSPC path are driven by
    making the real calls report what a full disk reports."""
    import errno
    import shutil

    import molae.checkpoint as ck

    real = shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    with pytest.raises(CheckpointError, match=r"not enough disk space at .*: need about [0-9.]+ [kMG]B, 10 B free"):
        convert_checkpoint(mixtral_src, tmp_path / "o", ConvertOptions(latent_dim=8))
    monkeypatch.setattr(ck.shutil, "disk_usage", real)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError, match=r"no space left .* rerun with --resume"):
        convert_checkpoint(mixtral_src, tmp_path / "o", ConvertOptions(latent_dim=8))
    assert not (tmp_path / "o").exists() and (tmp_path / ".o.molae-partial").is_dir()  # kept for --resume
    monkeypatch.undo()
    convert_checkpoint(mixtral_src, tmp_path / "o", ConvertOptions(latent_dim=8), resume=True)
    assert (tmp_path / "o" / "config.json").is_file()


def test_group_by_routing_makes_the_molae_groups_the_routers_groups(tmp_path, ids):
    """DeepSeek-V3's router limits each token to topk_group of n_group contiguous expert groups: --group-by routing
    gives MoLAE G = n_group with those groups (the same conversion as --groups n_group by index), so a token
    touches at most topk_group shared projections."""
    model = tiny_model("deepseek_v3", dtype=torch.float32)  # 8 experts in n_group = 2 groups, topk_group = 1
    src = save(model, tmp_path / "src")
    kw = dict(latent_dim=8, projections=("gate", "up", "down"))
    convert_checkpoint(src, tmp_path / "routing", ConvertOptions(group_by="routing", **kw))
    convert_checkpoint(src, tmp_path / "index", ConvertOptions(groups=2, **kw))
    cfg = json.loads((tmp_path / "routing" / "config.json").read_text())
    assert {v["groups"] for v in cfg["molae"]["layers"].values()} == {model.config.n_group}
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "routing")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "index")
    torch.testing.assert_close(logits(a, ids), logits(b, ids))
    layer = next(m for m in a.model.layers if hasattr(m.mlp, "gate") and hasattr(m.mlp.gate, "weight"))
    x = torch.randn(50, model.config.hidden_size)
    idx = layer.mlp.gate(x)[2]  # (logits, weights, indices) of transformers' router
    per_group = model.config.n_routed_experts // model.config.n_group
    assert max(len(set((r // per_group).tolist())) for r in idx) <= model.config.topk_group
    with pytest.raises(ValueError, match="has no expert groups"):
        convert_checkpoint(save(tiny_model("qwen2_moe", dtype=torch.float32), tmp_path / "q"), tmp_path / "qo",
                           ConvertOptions(group_by="routing", **kw))
    with pytest.raises(ValueError, match="leave out --groups 4"):
        convert_checkpoint(src, tmp_path / "x", ConvertOptions(group_by="routing", groups=4, **kw))
