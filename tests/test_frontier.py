"""[11] the frontier's plan, runner, fit and report: the fit on planted losses, and a tiny plan trained for
real on the CPU, resumed, and reported."""

import json
import math
from dataclasses import asdict

import pytest

from molae import frontier as FR
from molae.experiments import main as experiments
from molae.train import PRESETS
from test_train import data_dir, tiny_config  # noqa: F401  (the session's prepared corpus)


def summary(P, loss, seed=0):
    return dict(params=dict(non_embedding=P, active=P // 4, total=P + 1000), final_val_loss=loss, tokens=10 * P,
                train_flops=1e12, tokens_per_s=1e5, config=dict(seed=seed))


def test_fit_recovers_a_planted_frontier_and_reads_equivalent_sizes():
    a, b, shift = 5.0, -0.2, -0.03  # seed 1 shifts every run's loss alike (its data order), as the GPU runs show
    law = lambda P, s=0: a + shift * s + b * math.log(P)  # noqa: E731
    wiggle = iter([0.001, -0.001, 0.0005, -0.0005, 0.0])  # the runs' own noise, small against b
    runs = {f"moe-e{E}": summary(P, law(P) + next(wiggle)) for E, P in [(4, 1e6), (8, 2e6), (16, 4e6), (32, 8e6)]}
    runs["moe-e16-seed1"] = summary(4e6, law(4e6, 1), seed=1)
    runs["molae-d8"] = summary(3e6, law(6e6) + 0.001)  # matches a 6M standard MoE with 3M parameters
    runs["molae-d8-seed1"] = summary(3e6, law(6e6, 1) - 0.001, seed=1)
    fit = FR.fit_frontier(runs, reference="moe-e16")
    assert fit["a"]["0"] == pytest.approx(a, abs=0.01) and fit["a"]["1"] == pytest.approx(a + shift, abs=0.01)
    assert fit["b"] == pytest.approx(b, abs=0.002) and fit["dof"] == 5 - 3
    assert fit["parameter_limited"] and fit["points"] == 5 and fit["seed_pairs"] == 2
    pairs = [(law(4e6) + 0.0005, law(4e6, 1)), (law(6e6) + 0.001, law(6e6, 1) - 0.001)]
    assert fit["seed_sd"] == pytest.approx(math.sqrt(sum((x - y) ** 2 / 2 for x, y in pairs) / 2))
    e = fit["equivalents"]["molae-d8"]
    assert e["seeds"] == 2 and e["ratio"] == pytest.approx(2.0, rel=0.02)
    assert e["ratio_95"][0] < 2.0 < e["ratio_95"][1] and e["ratio_95"][0] > 1.5  # the seed shift is taken out
    v = e["vs_reference"]  # 6M-equivalent against the 4M reference, seed by seed: b ln(6/4) below it
    assert v["per_seed"] == pytest.approx([b * math.log(1.5) + 0.0005, b * math.log(1.5) - 0.001])
    assert v["diff_95"][0] < v["diff"] < v["diff_95"][1] < 0
    pooled = FR.fit_frontier({n: {**r, "config": dict(seed=0)} for n, r in runs.items()})  # the shift as noise
    assert pooled["residual_sd"] > 5 * fit["residual_sd"]
    flat = {n: summary(r["params"]["non_embedding"], 3.0 + 0.001 * (-1) ** i, FR._seed(r))
            for i, (n, r) in enumerate(runs.items()) if n.startswith("moe-")}
    assert not FR.fit_frontier(flat)["parameter_limited"]  # no gain from size: not the regime the issue asks for
    with pytest.raises(ValueError, match="at least three sizes"):
        FR.fit_frontier({"moe-e4": runs["moe-e4"], "moe-e8": runs["moe-e8"]})


def test_first_pass_loss_averages_the_windows_in_the_last_third_of_the_first_pass():
    step_tokens = 100  # windows of 10 steps: 1,000 tokens each; a training split of 9,000 tokens
    log = [dict(step=0, event="start")] + [dict(step=10 * i, loss=10.0 - i, tokens=1000 * i) for i in range(1, 13)]
    log.insert(5, dict(step=40, event="nonfinite_grad", loss=99.0, tokens=40 * step_tokens))  # not a window
    loss, tokens = FR.first_pass_loss(log, 9000)
    # windows ending at 7,000, 8,000, 9,000 start at or after 6,000 (two thirds) and end inside the pass
    assert tokens == 3000 and loss == pytest.approx((3.0 + 2.0 + 1.0) / 3)
    # at 9,500 the last third starts at 6,333: the window from 6,000 is out, the one ending at 10,000 too
    assert FR.first_pass_loss(log, 9500) == pytest.approx(((2.0 + 1.0) / 2, 2000))
    assert FR.first_pass_loss(log[:4], 9000) is None  # the run stopped before the pass's last third
    runs = {f"moe-e{E}": {**summary(P, 3.0), "first_pass_loss": 4.0 - 0.1 * math.log(P)}
            for E, P in [(4, 1e6), (8, 2e6), (16, 4e6)]}
    runs["molae-d8"] = {**summary(2e6, 3.0), "first_pass_loss": None}  # no first pass: left out of that fit
    fit = FR.fit_frontier(runs, metric="first_pass_loss")
    assert fit["b"] == pytest.approx(-0.1) and fit["metric"] == "first_pass_loss" and not fit["equivalents"]
    assert not FR.fit_frontier(runs)["parameter_limited"]  # the validation losses are flat


def test_batch_runs_reads_the_runs_a_frontier_log_names():
    log = ("/tmp/molae-data: train 104 tokens\nnm/moe-e4: n=m moe-e4: final validation loss 2.0972 after 1 tokens\n"
           "n4m/molae-d64-seed1: n=4m molae-d64-seed1: final validation loss 2.05 after 1 tokens\nfrontier.sh done\n")
    assert FR.batch_runs(log) == ["nm/moe-e4", "n4m/molae-d64-seed1"]


def test_the_plans_are_valid_configs_whose_standard_moes_span_4x():
    for shape, plan in FR.FRONTIER.items():
        sizes = {}
        for name in plan["variants"]:
            cfg = FR.variant_config(shape, name, steps=7)
            assert cfg.steps == 7 and cfg.name == f"{plan['base']}-{name}"
            if name.startswith("moe-") and "-seed" not in name:
                assert cfg.molae is None
                sizes[name] = cfg.model.get("num_experts")
        assert max(sizes.values()) >= 4 * min(sizes.values())
        assert PRESETS[plan["base"]].model["num_experts"] in sizes.values()
        name = next(iter(plan["variants"]))  # how every run executes: an override on top of the variant's own
        cfg = FR.variant_config(shape, name, overrides=["compile_mode=reduce-overhead"])
        assert cfg.compile_mode == "reduce-overhead" and cfg == FR.variant_config(shape, name).__class__(
            **{**vars(FR.variant_config(shape, name)), "compile_mode": "reduce-overhead"})


def test_a_tiny_frontier_trains_resumes_and_reports(data_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    base = tmp_path / "tiny.json"
    base.write_text(json.dumps(asdict(tiny_config(molae=None, steps=4, eval_every=4, ckpt_every=4, log_every=2))))
    plan = {"tiny": dict(base=str(base), reference="moe-e8", variants={
        "moe-e2": ["model.num_experts=2"], "moe-e4": ["model.num_experts=4"], "moe-e8": [],
        "molae-d8": ["molae.latent_dim=8"], "moe-e8-seed1": ["seed=1"]})}
    monkeypatch.setattr(FR, "FRONTIER", plan)
    monkeypatch.setattr("molae.experiments.FRONTIER", plan)
    assert FR.run_frontier("tiny", data_dir, tmp_path / "runs", only=["moe-e2"], progress=False) == ["moe-e2"]
    first = (tmp_path / "runs" / "tiny" / "moe-e2" / "summary.json").stat().st_mtime_ns
    assert experiments(["frontier-run", "tiny", "--data", str(data_dir), "--runs", str(tmp_path / "runs"),
                        "--no-progress"]) == 0
    assert (tmp_path / "runs" / "tiny" / "moe-e2" / "summary.json").stat().st_mtime_ns == first  # not run again
    runs = FR.load_runs(tmp_path / "runs", "tiny")
    assert set(runs) == set(plan["tiny"]["variants"]) and runs["moe-e8-seed1"]["config"]["seed"] == 1
    assert runs["moe-e2"]["params"]["non_embedding"] < runs["moe-e8"]["params"]["non_embedding"]
    assert experiments(["frontier", "--runs", str(tmp_path / "runs"), "--shape", "tiny", "--commit", "abc",
                        "--gpu-command", "cmd", "--device", "cpu", "--date", "today",
                        "--manifest", str(data_dir / "manifest.json"), "--out", str(tmp_path / "res")]) == 0
    md = (tmp_path / "res" / "pretrain_frontier.md").read_text()
    result = json.loads((tmp_path / "res" / "pretrain_frontier.json").read_text())
    fit = result["shapes"]["tiny"]["fit"]
    assert fit["points"] == 4 and fit["seed_pairs"] == 1 and "molae-d8" in fit["equivalents"]
    assert fit["dof"] == 4 - 3 and set(fit["a"]) == {"0", "1"}  # one intercept per seed, and the slope
    v = fit["equivalents"]["molae-d8"]["vs_reference"]
    assert v["per_seed"] == [runs["molae-d8"]["final_val_loss"] - runs["moe-e8"]["final_val_loss"]]
    train_tokens = json.loads((data_dir / "manifest.json").read_text())["tokens"]["train"]
    r = result["shapes"]["tiny"]["runs"]["moe-e2"]
    assert r["passes"] == runs["moe-e2"]["tokens"] / train_tokens and f"| {r['passes']:.2f} |" in md
    last = [x["load_imbalance"] for x in map(json.loads, (tmp_path / "runs" / "tiny" / "moe-e2" / "log.jsonl")
                                             .read_text().splitlines()) if x.get("load_imbalance")][-1]
    assert r["load_imbalance"] == last >= 1.0 and f"| {last:.2f} |" in md  # the busiest expert's share, last logged
    assert f"{abs(fit['b']):.4f} ln(P)" in md and "| molae-d8 |" in md and "Commit `abc`" in md
    assert (tmp_path / "res" / "pretrain_frontier.png").stat().st_size > 0
    (tmp_path / "b.log").write_text("tiny/moe-e2: tiny moe-e2: final validation loss 9.0 after 4 tokens\n")
    (tmp_path / "batches.json").write_text(json.dumps([dict(commit="c1", device="cpu", date="d1", command="go",
                                                           log="b.log")]))
    (tmp_path / "reading.md").write_text("## Reading\n\nno savings here\n")
    assert experiments(["frontier", "--runs", str(tmp_path / "runs"), "--shape", "tiny", "--out", str(tmp_path / "r2"),
                        "--batches", str(tmp_path / "batches.json"), "--conclusion", str(tmp_path / "reading.md")]) == 0
    e = json.loads((tmp_path / "r2" / "pretrain_frontier.json").read_text())["shapes"]["tiny"]["fit"]["equivalents"]
    row = f"| tiny | molae-d8 | {e['molae-d8']['params'] / 1e6:.2f}M |"
    conclusion = (tmp_path / "r2" / "pretrain.md").read_text()
    assert row in conclusion and FR.verdict(e["molae-d8"]["ratio_95"]) in conclusion
    assert conclusion.endswith("no savings here\n")
    assert [FR.verdict(r) for r in ([1.1, 2.0], [0.2, 0.9], [0.5, 1.5])] == [
        "saves parameters", "needs more parameters", "tied (interval includes 1)"]
    assert json.loads((tmp_path / "r2" / "pretrain_frontier.json").read_text())["batches"] == [
        dict(commit="c1", device="cpu", date="d1", command="go", runs=["tiny/moe-e2"])]
    assert "Commit `c1`, cpu, d1: `go` (tiny/moe-e2)" in (tmp_path / "r2" / "pretrain_frontier.md").read_text()
    assert experiments(["frontier", "--runs", str(tmp_path / "runs"), "--shape", "tiny", "--out",
                        str(tmp_path / "r3"), "--commit", "abc"]) == 2  # no provenance: a one-line error
    assert "--gpu-command, --device, --date missing" in capsys.readouterr().err and not (tmp_path / "r3").exists()
