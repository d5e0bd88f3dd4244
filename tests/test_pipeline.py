"""[8] the layer-by-layer conversion pipeline: decoder layers run one at a time on carried hidden
states (molae/sequential.py), statistics derived from captured inputs without E x n x n
(molae/calibrate.py, factorize.aware_*_streaming), methods as plug-ins (molae/methods), layer-wise
healing, resume after a kill, fp8 sources."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import molae  # noqa: F401  (registers the molae_<family> model types)
from molae.bench.convert import fp8_blocks
from molae.calibrate import LayerInputs, calibration_ids
from molae.checkpoint import CheckpointError, SourceCheckpoint
from molae.convert import ConvertOptions, convert_checkpoint, find_expert_groups
from molae.factorize import (aware_down, aware_down_streaming, aware_gate_up, aware_gate_up_streaming, gram_cosines,
                             hidden_mean_gram, regularized_grams, whiten)
from molae.layers import Experts
from molae.methods import METHODS
from molae.models import find_experts, use_standard_experts
from molae.sequential import LayerRunner
from tiny import FAMILIES, tiny_model

STDLIB = Path(sysconfig.get_paths()["stdlib"])
f64 = torch.float64


def saved(family, path, dtype=torch.float32, fused=False, **kw):
    model = tiny_model(family, vocab_size=512, dtype=dtype, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(path, save_original_format=not fused)
    return path


def runner_for(src, dtype=f64):
    ckpt = SourceCheckpoint(src)
    return LayerRunner(ckpt, {g.layer: g for g in find_expert_groups(ckpt).values()}, "cpu", dtype)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layers_one_at_a_time_reproduce_the_whole_model(family, fused, tmp_path):
    src = saved(family, tmp_path / "m", dtype=f64, fused=fused)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=f64, experts_implementation="eager")
    ids = torch.randint(0, 512, (4, 16))
    runner = runner_for(src)
    hidden = runner.start(ids, 2)
    for i in range(len(runner.meta_layers)):
        hidden, _ = runner.run(runner.load(i), i, hidden)
    torch.testing.assert_close(runner.base.norm(torch.cat(hidden)), model.model(input_ids=ids).last_hidden_state,
                               rtol=1e-12, atol=1e-12)


def random_layer_inputs(E=6, n=12, K=2, T=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=g, dtype=f64) * torch.logspace(0, -1, n, dtype=f64)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return LayerInputs(x, idx, torch.rand(T, K, generator=g, dtype=f64), E)


@pytest.mark.parametrize("G", [1, 2, 6])
def test_streaming_statistics_give_the_per_expert_gram_solution(G):
    """Fast path (captured inputs, [n, n] and smaller) against the reference (every expert's regularized
    Gram [E, n, n] at once) on fresh random inputs: the same products A_i B."""
    inputs = random_layer_inputs(seed=G)
    E, m, n, d = 6, 8, 12, 5
    W = {"gate": torch.randn(E, m, n, dtype=f64), "up": torch.randn(E, m, n, dtype=f64),
         "down": torch.randn(E, n, m, dtype=f64)}
    C = inputs.regularized_grams()
    Ch = regularized_grams(torch.stack([inputs.hidden_gram(e, W) for e in range(E)]), inputs.count)
    h_mean = hidden_mean_gram(inputs, W)
    for g in range(G):
        ex = list(range(g * E // G, (g + 1) * E // G))
        A0, B0, s0 = aware_gate_up(W["up"][ex], d, C[ex])
        A1, B1, s1, (err, total) = aware_gate_up_streaming(W["up"][ex], d, inputs, ex)
        torch.testing.assert_close(A1 @ B1, A0 @ B0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(s1[:len(s0)], s0, rtol=1e-9, atol=1e-9)
        X = [inputs.inputs(e) for e in ex]
        direct = sum(((W["up"][e] - A1[j] @ B1) @ X[j].T).square().sum() for j, e in enumerate(ex))
        assert err == pytest.approx(direct.item(), rel=1e-9) and total > err
        A0, B0, _ = aware_down(W["down"][ex], d, Ch[ex])
        A1, B1, _, _ = aware_down_streaming(W["down"][ex], d, inputs, ex, W, h_mean)
        torch.testing.assert_close(B1 @ A1, B0 @ A0, rtol=1e-9, atol=1e-9)


def test_gram_cosines_in_column_blocks_equal_the_whole_grams():
    W = torch.randn(7, 5, 11, dtype=f64)
    g = torch.stack([(w.T @ w).reshape(-1) for w in W])
    g = g / g.norm(dim=1, keepdim=True)
    torch.testing.assert_close(gram_cosines(W, chunk_entries=40), g @ g.T)


def test_pipeline_factors_equal_the_whole_model_reference(data_dir, tmp_path):
    """carry=original: each layer's factors are the reference solution on the inputs that layer's experts
    see in the whole original model (hooks on the full forward, per-expert Grams [E, n, n])."""
    src = saved("qwen3_moe", tmp_path / "src", dtype=f64)
    opts = ConvertOptions(latent_dim=6, projections=("gate", "up", "down"), calibration=str(data_dir),
                          calib_tokens=512, calib_seq_len=64, calib_batch=4, carry="original")
    convert_checkpoint(src, tmp_path / "m", opts)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=f64)
    use_standard_experts(model)
    seen = {}
    for name, module in find_experts(model):
        module.register_forward_hook(lambda m, a, k, o, n=name: seen.setdefault(n, []).append(
            a + tuple(k.values())), with_kwargs=True)
    ids = calibration_ids(data_dir, None, 512, 64)
    for b in range(0, len(ids), 4):
        model(input_ids=ids[b:b + 4])
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    for name, experts in find_experts(model):
        x, idx, w = (torch.cat([t[j] for t in seen[name]]) for j in range(3))
        inputs = LayerInputs(x, idx, w, experts.n_experts)
        W = experts.dense_weights()
        Ch = regularized_grams(torch.stack([inputs.hidden_gram(e, W) for e in range(inputs.E)]), inputs.count)
        A, B, _ = aware_gate_up(W["gate"], 6, inputs.regularized_grams())
        torch.testing.assert_close(got[f"{name}.gate_A"] @ got[f"{name}.gate_B"][0], A @ B, rtol=1e-8, atol=1e-8)
        A, B, _ = aware_down(W["down"], 6, Ch)
        torch.testing.assert_close(got[f"{name}.down_B"][0] @ got[f"{name}.down_A"], B @ A, rtol=1e-8, atol=1e-8)


def test_carrying_converted_outputs_changes_later_layers_only(data_dir, tmp_path):
    src = saved("qwen2_moe", tmp_path / "src")
    base = dict(latent_dim=4, projections=("gate", "up", "down"), calibration=str(data_dir), calib_tokens=512,
                calib_seq_len=64)
    a = convert_checkpoint(src, tmp_path / "conv", ConvertOptions(**base, carry="converted"))
    b = convert_checkpoint(src, tmp_path / "orig", ConvertOptions(**base))  # the default
    ta, tb = (load_file(str(tmp_path / p / "model.safetensors")) for p in ("conv", "orig"))
    assert torch.equal(ta["model.layers.0.mlp.experts.up_A"], tb["model.layers.0.mlp.experts.up_A"])
    assert not torch.equal(ta["model.layers.1.mlp.experts.up_A"], tb["model.layers.1.mlp.experts.up_A"])
    for s, carry in ((a, "converted"), (b, "original")):
        cfg = json.loads((tmp_path / ("conv" if carry == "converted" else "orig") / "config.json").read_text())
        assert cfg["molae"]["options"]["carry"] == carry and len(s["layers"]) == 2 * 3


def test_every_method_plugs_into_the_pipeline_and_the_cli(data_dir, tmp_path):
    from molae.cli import build_parser

    convert = next(a for a in build_parser()._subparsers._group_actions[0].choices["convert"]._actions
                   if a.dest == "method")
    assert list(convert.choices) == list(METHODS) and {"molae", "svd", "d2moe", "mobe", "hcsmoe"} <= set(METHODS)
    for name, m in METHODS.items():
        assert m.calibration in ("none", "optional", "required") and m.name == name


def test_layer_wise_healing_lowers_the_held_out_error_and_trains_only_factors(data_dir, tmp_path):
    torch.manual_seed(3)
    E, F_, D = 8, 16, 32
    original = Experts(D, F_, E).double()
    original.reset_parameters(0.2)
    W = original.dense_weights()
    from molae.factorize import latent_experts
    from molae.heal import heal_layer

    converted, _ = latent_experts(W, {"gate": D, "up": D, "down": D})  # full latent size: exact
    with torch.no_grad():  # a poor start that training can mend: exact factors, perturbed
        for p in converted.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    x = torch.randn(4000, D, dtype=f64)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(4000)])
    w = torch.rand(4000, 2, dtype=f64)
    info = heal_layer(converted, original, x, idx, w, steps=150, lr=3e-3, batch=1024)
    assert info["applied"] and info["held_out_error_after"] < 0.5 * info["held_out_error_before"]
    assert {n for n, _ in converted.named_parameters()} == {f"{k}_{f}" for k in ("gate", "up", "down") for f in "AB"}


def test_layer_wise_healing_through_convert(data_dir, tmp_path):
    src = saved("mixtral", tmp_path / "src")
    opts = ConvertOptions(latent_dim=8, projections=("gate", "up", "down"), calibration=str(data_dir),
                          calib_tokens=512, calib_seq_len=64, heal_steps=30)
    s = convert_checkpoint(src, tmp_path / "h", opts)
    healed = [r["layer_heal"] for r in s["layers"] if r["kind"] == "gate"]
    assert len(healed) == 2 and all(h["steps"] == 30 for h in healed)
    assert all(h["held_out_error_after"] <= h["held_out_error_before"] for h in healed)
    with pytest.raises(ValueError, match="--heal-steps"):
        convert_checkpoint(src, tmp_path / "x", ConvertOptions(latent_dim=8, heal_steps=5))


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "molae.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_calibrated_budgeted_conversion_resumes_after_a_kill(data_dir, tmp_path):
    src = saved("deepseek_v3", tmp_path / "src")
    args = ["convert", src, "--budget", "0.4", "--projections", "gate,up,down", "--calibration", data_dir,
            "--calib-tokens", 512, "--calib-seq-len", 64, "--max-shard-size", "1KB"]
    killed = cli(*args, "--out", tmp_path / "resumed", env={"_MOLAE_TEST_SIGNAL_AFTER_UNITS": "2"})
    assert killed.returncode == -9
    partial = tmp_path / ".resumed.molae-partial"
    state = json.loads((partial / "progress.json").read_text())
    assert state["done"] and state["state"]["carry"] and "plan" in state["state"]
    assert (partial / state["state"]["carry"]).is_file()
    r = cli(*args, "--out", tmp_path / "resumed", "--resume")
    assert r.returncode == 0, r.stderr
    assert cli(*args, "--out", tmp_path / "ref").returncode == 0
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == files
    for f in files:
        assert (tmp_path / "resumed" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_a_gram_that_is_not_positive_definite_is_one_line():
    with pytest.raises(ValueError, match="not positive definite with damp=0.0: raise --damp"):
        whiten(torch.zeros(4, 4, dtype=f64), 0.0)


def test_experts_without_calibration_tokens_fall_back_to_the_layer_mean(data_dir, tmp_path):
    src = saved("qwen2_moe", tmp_path / "src")
    r = cli("convert", src, "--out", tmp_path / "o", "--latent-dim", 4, "--calibration", data_dir,
            "--calib-tokens", 2, "--calib-seq-len", 2)
    assert r.returncode == 0, r.stderr
    assert "experts got no calibration tokens; their input statistics are the layer's mean" in r.stderr


# ----------------------------------------------------------------------------- fp8 sources


def fp8_copy(src: Path, dst: Path, block=(8, 8), drop_scales=False) -> Path:
    """src's checkpoint with its 2-D projection weights block-quantized to float8_e4m3fn as DeepSeek-V3
    stores them (W = q * weight_scale_inv per block), everything else as it was; returns dst."""
    dst.mkdir()
    tensors, out = load_file(str(src / "model.safetensors")), {}
    for k, t in tensors.items():
        if t.dim() != 2 or not k.endswith("proj.weight") and ".experts." not in k:
            out[k] = t
            continue
        q, scale = fp8_blocks(t, block)
        out[k] = q
        if not drop_scales:
            out[k.removesuffix("weight") + "weight_scale_inv"] = scale
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                      weight_block_size=list(block))
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def dequantized_copy(fp8: Path, dst: Path) -> Path:
    """What an fp8 checkpoint means: every tensor as SourceCheckpoint reads it, saved plainly."""
    ckpt = SourceCheckpoint(fp8)
    dst.mkdir()
    save_file(ckpt.read(ckpt.keys()), str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(ckpt.config)
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_fp8_block_dequantization_by_hand(tmp_path):
    src = saved("deepseek_v3", tmp_path / "src", dtype=torch.bfloat16)
    fp8 = fp8_copy(src, tmp_path / "fp8")
    ckpt = SourceCheckpoint(fp8)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    with safe_open(str(fp8 / "model.safetensors"), "pt") as f:
        q, s = f.get_tensor(key).float(), f.get_tensor(key.replace("weight", "weight_scale_inv"))
    i, j = 5, 13  # one entry, by hand: its block's scale times its fp8 value
    assert ckpt.read([key])[key][i, j].item() == pytest.approx((q[i, j] * s[i // 8, j // 8]).bfloat16().item())
    assert ckpt.dtype(key) == torch.bfloat16 and not any(k.endswith("_scale_inv") for k in ckpt.keys())
    orig = load_file(str(src / "model.safetensors"))[key].float()
    assert (ckpt.read([key])[key].float() - orig).norm() / orig.norm() < 0.05  # e4m3 keeps ~3 bits of mantissa


@pytest.mark.parametrize("calibrated", [False, True])
def test_an_fp8_source_converts_as_its_dequantized_weights_and_writes_bfloat16(calibrated, data_dir, tmp_path):
    src = saved("deepseek_v3", tmp_path / "src", dtype=torch.bfloat16)
    fp8 = fp8_copy(src, tmp_path / "fp8")
    plain = dequantized_copy(fp8, tmp_path / "plain")
    calib = dict(calibration=str(data_dir), calib_tokens=256, calib_seq_len=32) if calibrated else {}
    opts = ConvertOptions(latent_dim=6, projections=("gate", "up", "down"), **calib)
    convert_checkpoint(fp8, tmp_path / "a", opts)
    convert_checkpoint(plain, tmp_path / "b", opts)
    a, b = (load_file(str(tmp_path / p / "model.safetensors")) for p in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype in (torch.bfloat16, torch.int64) for t in a.values())
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))
    assert torch.isfinite(model(input_ids=torch.randint(0, 512, (1, 8))).logits).all()


def test_an_fp8_checkpoint_without_its_scales_is_one_line(tmp_path, capsys):
    from molae.cli import main

    src = saved("deepseek_v3", tmp_path / "src", dtype=torch.bfloat16)
    fp8 = fp8_copy(src, tmp_path / "fp8", drop_scales=True)
    with pytest.raises(CheckpointError, match="has no .*weight_scale_inv: the checkpoint lacks its scales"):
        SourceCheckpoint(fp8)
    capsys.readouterr()  # the save's progress bar
    assert main(["convert", str(fp8), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks its scales" in err[0] and not (tmp_path / "o").exists()
