"""The conversion benchmark's pieces at tiny shapes: synthetic checkpoints load strictly with
transformers, and a measured conversion writes its JSON and markdown."""

import json

import pytest

import molae  # noqa: F401
from molae.bench.convert import DEEPSEEK_V3_LAYER, QWEN15_MOE_A27B, bench_convert, synthetic_checkpoint, write_convert_results

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4,
            moe_intermediate_size=16)
TINY_QWEN = dict(QWEN15_MOE_A27B, **TINY, shared_expert_intermediate_size=24, num_experts=8, num_hidden_layers=2)
TINY_DSV3 = dict(DEEPSEEK_V3_LAYER, **TINY, n_routed_experts=16, n_group=4, topk_group=2, q_lora_rank=16,
                 kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def test_synthetic_checkpoints_have_the_real_layout(tmp_path):
    from transformers import AutoModelForCausalLM

    for name, cfg in (("qwen", TINY_QWEN), ("dsv3", TINY_DSV3)):
        info = synthetic_checkpoint(cfg, tmp_path / name, shard_size="20KB")
        assert info["shards"] > 1 and len(list((tmp_path / name).glob("model-*-of-*.safetensors"))) == info["shards"]
        _, loading = AutoModelForCausalLM.from_pretrained(tmp_path / name, output_loading_info=True)
        assert not any(loading.values()), loading  # no missing, unexpected or mismatched keys
        keys = json.loads((tmp_path / name / "model.safetensors.index.json").read_text())["weight_map"]
        assert any(k.endswith(".mlp.experts.7.gate_proj.weight") for k in keys)  # the hub's per-expert names


def test_bench_convert_measures_and_records(tmp_path):
    result = bench_convert(tmp_path / "work", "tiny-qwen", TINY_QWEN, "cpu", ["--latent-dim", "8"])
    assert result["wall_s"] > 0 and 0.05 < result["peak_rss_gb"] < 24
    assert result["layers_converted"] == 2 and len(result["layer_seconds"]) >= 1
    assert result["after"]["expert"] < result["before"]["expert"]
    assert not any((tmp_path / "work").iterdir())  # scratch checkpoints removed
    write_convert_results(result, tmp_path / "results", commit="abc1234")
    saved = json.loads((tmp_path / "results" / "convert" / "tiny-qwen-2L-data-free-abc1234.json").read_text())
    assert saved["commit"] == "abc1234" and saved["wall_s"] == result["wall_s"]
    md = (tmp_path / "results" / "convert.md").read_text()
    assert "| tiny-qwen | 2 | bf16 | data-free" in md and f"{result['wall_s']:.1f} s" in md and "`abc1234`" in md
    assert result["startup_seconds"] > 0 and result["seconds_per_layer"] > 0 and result["peak_gpu_gb"] == 0.0


def test_bench_convert_calibrated_from_fp8_sources(tmp_path):
    """The calibrated, budgeted pipeline on an fp8 synthetic checkpoint, measured and recorded."""
    from molae.data import prepare
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prepare([stdlib / "json", stdlib / "email"], tmp_path / "data", vocab_size=300, val_fraction=0.3, progress=False)
    cfg = dict(TINY_DSV3, vocab_size=320, moe_intermediate_size=32, hidden_size=64)
    args = ["--budget", "0.5", "--projections", "gate,up,down", "--calibration", str(tmp_path / "data"),
            "--calib-tokens", "256", "--calib-seq-len", "32"]
    result = bench_convert(tmp_path / "work", "tiny-dsv3", cfg, "cpu", args, layers=2, fp8=True)
    assert result["fp8"] and result["calibrated"] and result["layers"] == 2 and result["layers_converted"] == 2
    assert result["allocate_seconds"] > 0 and result["source"]["fp8"]
    assert result["after"]["expert"] <= 0.5 * result["before"]["expert"] + 64
    assert all(v is not None for k, v in result["mean_rel_output_error"].items())
    write_convert_results(result, tmp_path / "results", commit="def5678")
    assert (tmp_path / "results" / "convert" / "tiny-dsv3-2L-calibrated-fp8-def5678.json").is_file()
    assert "| tiny-dsv3 | 2 | fp8 | calibrated" in (tmp_path / "results" / "convert.md").read_text()


def test_bench_ep_on_two_gloo_processes(tmp_path):
    """`molae bench ep` on the CPU: the bytes each implementation sends follow the widths exactly (the routing is
    the same for all), equal the formula on every rank, and the report is written."""
    import subprocess
    import sys

    out = tmp_path / "ep"
    proc = subprocess.run([sys.executable, "-m", "molae.cli", "bench", "ep", "--procs", "2", "--device", "cpu",
                           "--shape", "40,16,8,2", "--tokens", "32", "--repeats", "2", "--warmup", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "ep.json").read_text())
    fwd = {r["impl"]: r for r in result["rows"] if r["mode"] == "forward"}
    assert set(fwd) == {"moe", "molae", "molae-budget"} and len(result["rows"]) == 6
    n, moe = 40, fwd["moe"]
    assert moe["dispatch_bytes"] == moe["combine_bytes"] > 0
    for impl in ("molae", "molae-budget"):
        r, d = fwd[impl], fwd[impl]["latent"]
        assert r["dispatch_bytes"] * n == moe["dispatch_bytes"] * 2 * d and r["combine_bytes"] * n == moe["combine_bytes"] * d
        assert r["bytes_match_formula"] and r["metadata_bytes"] == moe["metadata_bytes"]
        assert set(r["phases_ms"]) == {"route", "dispatch", "experts", "combine", "finish"}
    assert fwd["molae"]["latent"] == 16  # d = m
    assert (out / "ep.md").read_text().count("\n| 40,16,8,2 |") == 6


def test_bench_ep_refuses_more_gpus_than_there_are(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "molae.cli", "bench", "ep", "--procs", "64", "--out",
                           str(tmp_path / "ep")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--device" in proc.stderr and not (tmp_path / "ep").exists()


def test_bench_generate_times_each_implementation_of_a_saved_model(tmp_path, capsys, monkeypatch):
    import torch
    from tiny import tiny_model
    from transformers.generation.utils import GenerationMixin

    from molae.bench.generate import IMPLS
    from molae.cli import main

    asked, criteria = [], GenerationMixin._valid_auto_compile_criteria

    def spy(self, model_kwargs, generation_config):  # generate's own compilation: off unless --compile
        asked.append(generation_config.disable_compile)
        return criteria(self, model_kwargs, generation_config)
    monkeypatch.setattr(GenerationMixin, "_valid_auto_compile_criteria", spy)
    tiny_model("qwen3_moe", dtype=torch.float32).save_pretrained(tmp_path / "src")
    # bfloat16, as on the GPU: the conversion factorizes in float32 and keeps the model's dtype
    code = main(["bench", "generate", "--model", str(tmp_path / "src"), "--device", "cpu", "--dtype", "bfloat16",
                 "--prefill", "8,16", "--batch", "1,2", "--new-tokens", "4", "--out", str(tmp_path / "r")])
    assert code == 0
    r = json.loads((tmp_path / "r" / "generate.json").read_text())
    rows = {x["impl"]: x for x in r["rows"]}
    assert list(rows) == list(IMPLS)
    for impl in ("hf-eager", "moe", "molae", "moe/grouped", "molae/grouped"):  # (transformers' batched/grouped
        # kernels may not run on a CPU; ours forced onto the grouped path take it here anyway: no Triton)
        x = rows[impl]
        assert "error" not in x, x
        assert [p["tokens"] for p in x["prefill"]] == [8, 16] and all(p["tokens_per_s"] > 0 for p in x["prefill"])
        assert [d["batch"] for d in x["decode"]] == [1, 2] and all(d["tokens_per_s"] > 0 for d in x["decode"])
        assert [d["batch"] for d in x["decode_graph"]] == [1, 2] and all(d["tokens_per_s"] > 0
                                                                          for d in x["decode_graph"])
        assert x["graph_same_tokens"] is True, impl  # the graph loop decodes the same greedy tokens as generate
    assert rows["moe"]["same_tokens_as_reference"] is True  # our standard experts: the same function
    assert rows["moe/grouped"]["same_tokens_as_reference"] is True and rows["moe"]["tokens_reference"] == "hf-eager"
    assert asked and all(a is True for a in asked) and "partial" not in r
    out = capsys.readouterr().out
    assert f"{tmp_path / 'src'} molae: decode batch 2:" in out and "moe/grouped: prefill 16:" in out
    assert rows["molae"]["decode_bytes"] < rows["moe"]["decode_bytes"] == rows["hf-eager"]["decode_bytes"]
    assert rows["molae"]["params"] < rows["moe"]["params"]
    md = (tmp_path / "r" / "generate.md").read_text()
    assert "MoLAE speed-up" in md and "decode B=2" in md and "| graph B=2 |" in md and r["commit"] and r["command"]
    ran = sum("error" not in x for x in r["rows"])
    assert f"Graph loop's tokens = generate's: {ran} of {ran} implementations" in md


def test_bench_generate_models_are_real_shapes_or_directories(tmp_path, capsys):
    from molae.bench.generate import model_config
    from molae.cli import main

    name, c = model_config("deepseek-v3:2")
    assert name == "deepseek-v3:2" and c["num_hidden_layers"] == 3 + 2 and c["n_routed_experts"] == 256
    assert model_config("qwen3-30b-a3b")[1]["num_hidden_layers"] == 2
    assert main(["bench", "generate", "--model", "nope:3", "--device", "cpu", "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "neither NAME:LAYERS" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_graph_decoder_compiled_decodes_what_generate_decodes(tmp_path):
    """The graph loop compiled (one hand-captured CUDA graph a step on the GPU, Inductor here, where the experts'
    host-synced fallback breaks the graph, so not fullgraph) on a tiny Qwen3-MoE with our MoLAE experts: the same
    greedy tokens as transformers' generate, twice (the cache is reset; each replay's output is cloned)."""
    import torch
    from tiny import tiny_model

    from molae.bench.generate import GraphDecoder, build, greedy

    tiny_model("qwen3_moe", dtype=torch.float32).save_pretrained(tmp_path / "src")
    model = build(str(tmp_path / "src"), "molae", "cpu", torch.bfloat16, 0.5)  # as on the GPU (and float32
    # grouped_mm has no fake-tensor kernel on the CPU)
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = greedy(model, ids, 6, compile_=False)[:, 8:]
        decode = GraphDecoder(model, 8 + 6, compile_=True)
        assert torch.equal(decode(ids, 6), want) and torch.equal(decode(ids, 6), want)  # again: the cache reset
