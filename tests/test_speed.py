"""`molae bench layer` on the CPU at tiny shapes: every implementation timed at every size and mode,
FLOP and weight-byte accounting checked by hand, speed-ups consistent, results written whole."""

import json
import subprocess
import sys

import pytest
import torch

from molae.bench.layer import IMPLS, STANDARD, Shape, bench_layer, build, parse_shape, report, useful_flops, weight_bytes

TINY = Shape("tiny", 64, 32, 8, 2)


def test_accounting_of_flops_and_weight_bytes_by_hand():
    idx = torch.tensor([[0, 1], [1, 5], [6, 7]])  # 3 tokens; experts 0,1,5,6,7; groups of 1: {0},{1},{5},{6},{7}
    D, F_, L = 64, 32, 32
    assert useful_flops("moe", TINY, idx) == 6 * D * F_ * 6
    assert useful_flops("molae-g1", TINY, idx) == 6 * L * (D * 3 + F_ * 6)
    assert useful_flops("molae-g8", TINY, idx) == 6 * L * (D * 6 + F_ * 6)  # G = E: every slot its own pair
    for impl, expect in [("hf-grouped_mm", 5 * 3 * D * F_ * 4), ("moe", 5 * 3 * D * F_ * 4),
                         ("molae-g1", (3 * L * D + 5 * 3 * F_ * L) * 4), ("molae-g8", 5 * 3 * (L * D + F_ * L) * 4)]:
        module = build(impl, TINY, "cpu", torch.float32)
        assert weight_bytes(module, TINY, impl, idx) == expect, impl


def test_bench_layer_times_everything_and_reports(tmp_path):
    shapes = [TINY, parse_shape("48,64,6,2")]
    result = bench_layer(shapes, list(IMPLS), [16, 32], [1, 4], "cpu", torch.float32, sets=2, peak_size=64)
    rows = result["rows"]
    for s in shapes:
        for impl in IMPLS:
            for T, mode in [(16, "forward"), (32, "forward+backward"), (4, "decode")]:
                r = next(r for r in rows if (r["shape"], r["impl"], r["tokens"], r["mode"]) == (s.name, impl, T, mode))
                assert r["ms"] > 0 and r["tflops"] > 0 and r["repeats"] >= 5
                best = min(x["ms"] for x in rows if (x["shape"], x["tokens"], x["mode"]) == (s.name, T, mode)
                           and x["impl"] in STANDARD)
                assert r["speedup"] == pytest.approx(best / r["ms"])
        assert any(r["mode"] == "grouped forward (grouped_mm)" and r["shape"] == s.name for r in rows)
    assert next(r for r in rows if r["impl"] == "molae-g8" and r["shape"] == "48,64,6,2")["groups"] == 6  # 8 !| 6
    assert {r["mode"] for r in rows} >= {"forward", "forward+backward", "decode"}
    assert not any(r["mode"] == "forward (CUDA graph)" for r in rows)  # CUDA only
    paths = {(r["impl"], r["path"]) for r in rows if r["mode"] in ("forward", "forward+backward", "decode")}
    assert paths == {("hf-eager", None), ("hf-grouped_mm", None), ("moe", "grouped"), ("molae-g1", "grouped"),
                     ("molae-g8", "grouped")}  # no Triton on CPU tensors: the grouped path, no forced twin
    result.update(command="test", device="cpu", date="today", commit="abc", torch="t", transformers="x")
    md = report(result)
    assert "## Targets" in md and "| tiny | 16 |" in md and "decode" in md and "commit `abc`" in md


def test_targets_read_decode_bandwidth_and_aligned_groups_off_the_rows():
    from molae.bench.layer import _targets

    def row(impl, mode, T, ms, **kw):
        return dict(shape="deepseek-v3", impl=impl, mode=mode, tokens=T, ms=ms, **kw)

    rows = [row("molae-g1", "decode", 1, 1.0, weight_bytes=100, bandwidth_fraction=0.40),
            row("molae-g1", "decode", 8, 1.0, weight_bytes=100, bandwidth_fraction=0.45),
            row("molae-g8", "decode", 1, 2.4, weight_bytes=200, bandwidth_fraction=0.3),  # 1.2x its byte ratio
            row("molae-g1", "forward", 512, 1.0, flops=10), row("molae-g8", "forward", 512, 1.5, flops=15)]
    out = "\n".join(_targets(rows, ["deepseek-v3"], [512]))
    assert "decode on deepseek-v3, MoLAE G=1, fraction of the copy bandwidth: 1: 40%, 8: 45%" in out
    assert "(target >= 35% at 1-4 tokens, >= 50% at 8-64: not met)" in out  # 45% < 50% at 8 tokens
    assert "decode 1: 1.20, forward 512: 1.00 (target <= 1.15: not met)" in out
    rows[2]["ms"] = 2.2
    out = "\n".join(_targets(rows, ["deepseek-v3"], [512]))
    assert "decode 1: 1.10, forward 512: 1.00 (target <= 1.15: met)" in out


def test_the_report_adds_the_graphed_forward_where_a_run_timed_it():
    from molae.bench.layer import GRAPHED, GRAPHED_BACKWARD, modes_for, report

    assert modes_for("molae-g1", "cpu") == ("forward", "forward+backward")  # captured on CUDA only
    assert GRAPHED not in modes_for("hf-eager", "cuda") and GRAPHED_BACKWARD not in modes_for("hf-eager", "cuda")
    assert modes_for("moe", "cuda") == ("forward", "forward+backward", GRAPHED, GRAPHED_BACKWARD)
    assert modes_for("moe", "cuda", 4096) == modes_for("moe", "cuda")  # graphed backward up to 4096 tokens
    assert modes_for("moe", "cuda", 8192) == ("forward", "forward+backward", GRAPHED)

    def row(impl, mode, ms, speedup=None):  # the report's input format, with made-up times: formatting only
        r = dict(shape="s", impl=impl, mode=mode, tokens=512, ms=ms, tflops=1.0, peak_fraction=0.1, peak_gb=None,
                 flops=10.0)
        return r | (dict(speedup=speedup, best_standard="moe") if speedup else {})

    rows = [row("moe", "forward", 2.0), row("molae-g1", "forward", 2.5, 0.8),
            row("moe", GRAPHED, 1.0), row("molae-g1", GRAPHED, 0.5, 2.0)]
    result = dict(ceilings=dict(matmul_tflops=1.0, matmul_size=8, copy_tb_s=1.0, copy_bytes=8),
                  shapes=[dict(name="s", dim=8, inter=8, n_experts=2, top_k=1, latent=8)], impls=["moe", "molae-g1"],
                  dtype="bfloat16", sets=2, rows=rows, skipped=[], command="c", device="d", date="t", commit="x",
                  torch="t", transformers="x")
    md = report(result)
    assert f"## {GRAPHED}: milliseconds" in md and "| s | 512 | 1.000 | 0.500 (2.00x) |" in md
    assert "- s, forward: MoLAE G=1 slower at 512 tokens" in md and f"- s, {GRAPHED}: MoLAE" not in md


def test_bench_layer_cli_writes_results_and_rejects_bad_input(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "molae.cli", "bench", "layer", *a],  # noqa: E731
                                    capture_output=True, text=True)
    p = run("--shape", "64,32,8,2", "--impls", "moe,molae-g1", "--tokens", "16", "--decode-tokens", "1",
            "--device", "cpu", "--dtype", "float32", "--peak-size", "64", "--out", str(tmp_path), "--commit", "c0ffee")
    assert p.returncode == 0, p.stderr
    data = json.loads((tmp_path / "speed.json").read_text())
    assert data["commit"] == "c0ffee" and {r["impl"] for r in data["rows"]} == {"moe", "molae-g1"}
    assert (tmp_path / "speed.md").read_text().startswith("# MoLAE layer speed")
    assert not list(tmp_path.glob("*.partial"))
    for bad, what in [(["--impls", "moe,fast"], "--impls"), (["--shape", "7,7"], "shape"),
                      (["--device", "cuda"] if not torch.cuda.is_available() else ["--shape", "4,4,2,3"], "")]:
        p = run(*bad, "--device", "cpu", "--out", str(tmp_path / "x")) if bad[0] != "--device" else run(
            *bad, "--out", str(tmp_path / "x"))
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and what in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()


def test_deepseek_v3_shapes_are_routed_within_4_of_their_8_groups():
    from molae.bench.layer import inputs

    shape = parse_shape("deepseek-v3")
    assert (shape.n_group, shape.topk_group) == (8, 4)
    x = inputs(shape, 64, 1, "cpu", torch.float32, torch.Generator().manual_seed(0))[0]
    groups = torch.tensor([len(set((r // 32).tolist())) for r in x["idx"]])
    assert groups.max() <= 4 and all(len(set(r.tolist())) == 8 for r in x["idx"])  # still 8 distinct experts
    assert parse_shape("qwen3-30b-a3b").n_group == 1
