"""`molae data prepare` and `molae train`: data, trainer, checkpoints/resume, FSDP2 with 2 gloo processes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import molae  # noqa: F401  (registers the molae_* model types)
from molae import data as D
from molae import train as T
from molae.layers import Experts, LatentMoEExperts

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
            moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
            tie_word_embeddings=False)


def tiny_config(**kw) -> T.TrainConfig:
    base = dict(name="tiny", family="qwen2_moe", model=dict(TINY), molae={"latent_dim": 16, "groups": 2}, seq_len=64,
                batch_size=4, steps=12, warmup=3, log_every=1, eval_every=6, ckpt_every=4, eval_tokens=2048, lr=3e-3)
    return T.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "prepared"
    D.prepare([STDLIB / "json", STDLIB / "email", STDLIB / "asyncio", STDLIB / "http"], out, vocab_size=512,
              val_fraction=0.3, tokenizer_bytes=0, progress=False)
    return out


def cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "molae.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


# ----------------------------------------------------------------------------- data


def write_package(root: Path, name: str, text: str, n: int = 3):
    for i in range(n):
        p = root / name / f"sub{i % 2}" / f"m{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"# {name} {i}\n" + text * 20 + f"\nx_{i} = {i}\n")


def test_prepare_splits_by_package_and_trains_the_tokenizer_on_training_text_only(tmp_path):
    src = tmp_path / "src"
    for k in range(40):
        write_package(src, f"pkg{k}", f"def f{k}(a, b):\n    return a + b * {k}\n")
    marker = "qqzzyyxxwwvv"  # only in validation files: a train-only tokenizer learns no merge for it
    keys = [D.split_key(Path(f"pkg{k}/sub{s}/m.py")) for k in range(40) for s in (0, 1)]
    val_keys = {k for k in keys if D.in_validation(k, 0.2)}
    assert val_keys and len(val_keys) < len(keys)
    for key in val_keys:
        for p in (src / key).glob("*.py"):
            p.write_text(p.read_text() + f"\n{marker} = '{marker}' * 3  # {marker}\n" * 30)
    (src / "notes.txt").write_text("not python")  # not matched by the default pattern
    m = D.prepare([src], tmp_path / "out", vocab_size=400, val_fraction=0.2, progress=False)
    rows = [line.split("\t") for line in (tmp_path / "out" / "files.tsv").read_text().splitlines()[1:]]
    split_of = {}
    for split, key, *_ in rows:
        assert split_of.setdefault(key, split) == split, f"{key} is in both splits"
    assert {k for k, s in split_of.items() if s == "val"} == val_keys
    assert not any(r[5].endswith(".txt") for r in rows)
    td = D.TokenData(tmp_path / "out")
    assert td.train.size == m["tokens"]["train"] and td.val.size == m["tokens"]["val"]
    assert sum(int(r[3]) for r in rows if r[0] == "train") == td.train.size
    assert td.train.dtype == np.uint16 and int(td.train.max()) < m["vocab_size"]
    tok = td.tokenizer()
    assert len(tok.tokenize(marker)) > 3, "the tokenizer saw validation text"
    assert len(tok.tokenize("    return a + b")) < len("    return a + b") / 2  # it learned the training text
    eot = m["eot_id"]
    assert (td.val == eot).sum() == m["files"]["val"]  # one end-of-text per document
    assert tok.decode(td.train[: int(np.argmax(td.train == eot))].tolist()).startswith("# pkg")
    assert len(m["file_list_sha256"]) == 64 and len(m["tokenizer_sha256"]) == 64
    # Same input, same tokenizer: same bytes (deterministic), and --tokenizer reuses it.
    m2 = D.prepare([src], tmp_path / "out2", val_fraction=0.2, tokenizer=tmp_path / "out" / "tokenizer", progress=False)
    assert m2["tokenizer_sha256"] == m["tokenizer_sha256"] and m2["file_list_sha256"] == m["file_list_sha256"]
    assert (tmp_path / "out" / "train.bin").read_bytes() == (tmp_path / "out2" / "train.bin").read_bytes()


def test_prepare_reads_jsonl_and_txt_and_drops_duplicates(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(30)))
    (tmp_path / "b.txt").write_text("plain text file " * 100)
    (tmp_path / "c.txt").write_text("plain text file " * 100)  # same content as b: dropped
    more = []
    for i in range(8):
        more.append(tmp_path / f"n{i}.txt")
        more[-1].write_text(f"text {i} " * 50)
    m = D.prepare([tmp_path / "a.jsonl", tmp_path / "b.txt", tmp_path / "c.txt", *more], tmp_path / "out",
                  vocab_size=300, val_fraction=0.5, progress=False)
    assert m["skipped"]["duplicate"] == 1
    td = D.TokenData(tmp_path / "out")
    assert int((td.train == m["eot_id"]).sum() + (td.val == m["eot_id"]).sum()) == 30 + 1 + 8  # records + files


def test_prepare_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    r = cli("data", "prepare", tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    (tmp_path / "only.py").write_text("x = 1\n")
    r = cli("data", "prepare", tmp_path / "only.py", "--out", tmp_path / "o")
    assert r.returncode == 2 and "left validation empty" in r.stderr or "left training empty" in r.stderr
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    r = cli("data", "prepare", tmp_path / "bad.jsonl", tmp_path / "only.py", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--text-field" in r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_batches_are_a_function_of_seed_step_and_index(data_dir):
    td = D.TokenData(data_dir)
    a, b = td.batch(0, 5, 1, 4, 32), td.batch(0, 5, 1, 4, 32)
    assert a.shape == (4, 33) and torch.equal(a, b)
    assert not torch.equal(a, td.batch(0, 5, 0, 4, 32)) and not torch.equal(a, td.batch(0, 6, 1, 4, 32))
    s = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(td.train, 33) == a[0].numpy(), axis=1))[0])
    assert torch.equal(torch.from_numpy(td.train[s:s + 33].astype(np.int64)), a[0])  # a real window of train.bin
    w = td.val_windows(32, 320)
    assert w.shape == (10, 33)


def test_bigram_loss_of_a_deterministic_and_a_random_sequence():
    cyc = np.tile(np.arange(50, dtype=np.uint16), 400)
    assert D.bigram_loss(cyc[:10000], cyc[10000:], 50)["bigram_loss"] < 0.06  # next token fully determined
    rng = np.random.default_rng(0)
    r = D.bigram_loss(rng.integers(0, 50, 50000).astype(np.uint16), rng.integers(0, 50, 5000).astype(np.uint16), 50)
    assert abs(r["unigram_loss"] - np.log(50)) < 0.02 and r["bigram_loss"] > np.log(50) - 0.05


# ----------------------------------------------------------------------------- model pieces


def test_latent_moe_experts_is_project_route_project():
    torch.manual_seed(0)
    m = LatentMoEExperts(24, 16, 6, 8)
    x, idx = torch.randn(10, 24), torch.randint(0, 6, (10, 2))
    w = torch.rand(10, 2)
    ref = Experts(8, 16, 6)
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("proj_")})
    ref.impl = "reference"
    want = ref(x @ m.proj_in.T, idx, w) @ m.proj_out.T
    torch.testing.assert_close(m(x, idx, w), want, rtol=1e-5, atol=1e-6)


def test_product_init_has_the_whole_matrix_scale():
    torch.manual_seed(0)
    e = Experts(256, 128, 16, {"gate": 64, "down": 32}, groups=2)
    e.reset_parameters(0.02)
    W = e.dense_weights()
    for kind in ("gate", "up", "down"):
        assert abs(W[kind].std().item() - 0.02) < 0.002, kind


def test_fast_path_under_cpu_autocast_agrees_with_the_float32_reference():
    torch.manual_seed(1)
    e = Experts(64, 32, 8, {"gate": 16, "up": 16, "down": 16}, groups=2)
    x, idx, w = torch.randn(40, 64), torch.randint(0, 8, (40, 2)), torch.rand(40, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = e(x, idx, w)
    assert y.dtype == torch.bfloat16
    e.impl = "reference"
    torch.testing.assert_close(y.float(), e(x, idx, w), rtol=3e-2, atol=3e-2)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny_config(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [T.lr_at(s, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[100] == pytest.approx(0.1)


def test_presets_build_and_reference_models_are_50_to_200m_parameters():
    from molae.evaluate import efficiency

    for name, cfg in T.PRESETS.items():
        with torch.device("meta"):
            model = T.build_model(cfg, 16384 if name != "demo" else 256)
        total = efficiency(model)["total_params"]
        if name.startswith("ref-"):
            assert 50e6 <= total <= 200e6, (name, total)
    with torch.device("meta"):
        ds = T.build_model(T.PRESETS["ref-deepseek-v3"], 16384)
    assert T.moe_layers(T.base_config(T.PRESETS["ref-deepseek-v3"], 16384))[0] == 1  # first layer dense
    assert any(n.endswith("e_score_correction_bias") for n, _ in ds.named_buffers())


def test_overrides_and_config_errors():
    cfg = T.apply_overrides(tiny_config(), ["lr=0.01", "model.num_hidden_layers=3", "molae.groups=4"])
    assert cfg.lr == 0.01 and cfg.model["num_hidden_layers"] == 3 and cfg.molae["groups"] == 4
    assert T.apply_overrides(cfg, ["molae=null"]).molae is None
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        T.apply_overrides(cfg, ["lrr=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        T.apply_overrides(cfg, ["lr"])
    with pytest.raises(ValueError, match="neither a preset"):
        T.load_config("no-such-preset")
    with pytest.raises(ValueError, match="unknown keys"):
        T.build_model(tiny_config(molae={"latent": 3}), 512)
    assert T.apply_overrides(cfg, ["compile_mode=reduce-overhead"]).compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match=r"compile_mode='graphs' \(allowed default, reduce-overhead"):
        T.apply_overrides(cfg, ["compile_mode=graphs"])
    with pytest.raises(ValueError, match=r"compile_scope='stack' \(allowed layer, model\)"):
        T.apply_overrides(cfg, ["compile_scope=stack"])


def test_load_meter_adds_every_forward_since_the_last_take_into_tensors_of_its_own():
    from molae.train.metrics import LoadMeter

    model = T.build_model(tiny_config(), 512)
    meter = LoadMeter(model)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        model(input_ids=x)
        meter.settle()  # what the trainer does after each micro-batch's forward
        once = {k: v.clone() for k, v in meter.counts.items()}
        model(input_ids=x)  # the same batch again: twice the counts
    counts = meter.take()
    assert set(counts) == set(once) == set(range(TINY["num_hidden_layers"])) and meter.take() == {}
    for k, c in counts.items():
        assert torch.equal(c, 2 * once[k]) and c.sum() == 2 * x.numel() * TINY["num_experts_per_tok"]
        assert all(c.data_ptr() != p.data_ptr() for p in once.values())
    with torch.no_grad():
        model(input_ids=x)  # an evaluation's forward: dropped unread
    meter.discard()
    assert meter.take() == {}


def test_load_meter_hook_compiles_without_a_graph_break():
    """The hook runs inside compiled layers: a graph break there (bincount's data-dependent shape, a list
    Dynamo cannot follow) splits every MoE layer's graph and recompiles each step (seen on the GPU, torch 2.11)."""
    from molae.train.metrics import LoadMeter

    meter = LoadMeter(T.build_model(tiny_config(), 512))
    hook = meter._hook(0, 8)

    def f(idx):
        hook(None, (None, idx), None)
        return idx + 1

    idx = torch.randint(0, 8, (16, 2))
    explained = torch._dynamo.explain(f)(idx)
    assert explained.graph_break_count == 0, explained.break_reasons
    meter.discard()
    torch.compile(f, fullgraph=True)(idx)
    assert torch.equal(meter.take()[0], torch.bincount(idx.reshape(-1), minlength=8))


# ----------------------------------------------------------------------------- training


def test_training_lowers_validation_loss_and_the_saved_model_reproduces_it(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(steps=30, eval_every=30, log_every=5, ckpt_every=30, eval_tokens=4096)
    summary = T.train(cfg, data_dir, tmp_path / "run", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.5
    assert summary["final_val_loss"] < np.log(512) - 0.5
    for r in train_recs:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["load_imbalance"] >= 1 and r["aux_loss"] > 0
    assert summary["tokens"] == 30 * 4 * 64 and summary["params"]["routed_experts"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert type(model).__name__ == "MolaeQwen2MoeForCausalLM"
    assert model.model.layers[0].mlp.experts.latent == {"gate": 16, "up": 16}
    td = D.TokenData(data_dir)
    amp = contextlib.nullcontext
    val = T.validation_loss(model, td, cfg, T.Run("cpu"), amp)
    assert val == pytest.approx(summary["final_val_loss"], rel=1e-5)


@pytest.mark.parametrize("cudnn", [False, True])
def test_cudnn_attention_is_off_while_training_unless_asked_and_restored_after(cudnn, data_dir, tmp_path, monkeypatch):
    """cuDNN's SDPA backward gives sporadic NaN gradients on H100/H200 (config.cudnn_attention): the trainer turns
    it off for the run (a process-wide switch, so every forward sees it) and puts the switch back after."""
    from molae.train import loop

    seen, losses = [], loop._losses

    def spy(*args):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return losses(*args)
    monkeypatch.setattr(loop, "_losses", spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(not cudnn)  # the opposite of what the run asks for
    try:
        T.train(tiny_config(steps=2, eval_every=2, ckpt_every=2, cudnn_attention=cudnn), data_dir, tmp_path / "r",
                progress=False)
        assert seen and set(seen) == {cudnn}
        assert torch.backends.cuda.cudnn_sdp_enabled() is (not cudnn)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("scope", ["layer", pytest.param("model", marks=pytest.mark.slow)])
def test_compiled_training_follows_the_eager_loss_curve(scope, data_dir, tmp_path):
    """`compile` (each decoder layer or the whole model, and the loss) trains as eager does: the same seed and
    batches give the same losses within bfloat16's rounding, in bfloat16 autocast (the grouped_mm path; CPU
    compilation takes bfloat16). The whole-model scope (opt-in, not the default) is `slow`: its graphs are
    checked by test_the_whole_model_compiles_into_at_most_two_graphs, and its minute of CPU compilation kept CI
    over its 15 minutes."""
    cfg = tiny_config(steps=4, eval_every=4, ckpt_every=4, log_every=1, dtype="bfloat16")
    T.train(cfg, data_dir, tmp_path / "eager", progress=False)
    T.train(replace(cfg, compile=True, compile_scope=scope), data_dir, tmp_path / "compiled", progress=False)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3, 4]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=2e-2, abs=2e-2), step


def test_standard_moe_run_exports_the_family_model_that_convert_and_decompress_take(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from molae.convert import ConvertOptions, convert_checkpoint, decompress_checkpoint

    T.train(tiny_config(molae=None, steps=4, eval_every=4, ckpt_every=4), data_dir, tmp_path / "moe", progress=False)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "moe" / "model")
    assert type(base).__name__ == "Qwen2MoeForCausalLM"
    convert_checkpoint(tmp_path / "moe" / "model", tmp_path / "conv", ConvertOptions(latent_dim=64))
    conv = AutoModelForCausalLM.from_pretrained(tmp_path / "conv")
    x = torch.randint(0, 512, (2, 32))
    torch.testing.assert_close(conv(x).logits, base(x).logits, rtol=1e-4, atol=1e-4)  # d = n: lossless
    # A trained MoLAE run decompresses into the plain family with identical outputs.
    T.train(tiny_config(steps=4, eval_every=4, ckpt_every=4), data_dir, tmp_path / "molae", progress=False)
    decompress_checkpoint(tmp_path / "molae" / "model", tmp_path / "dec")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "molae" / "model")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "dec")
    assert type(b).__name__ == "Qwen2MoeForCausalLM"
    torch.testing.assert_close(b(x).logits, a(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_other_families_train_and_deepseek_balances_with_its_bias(family, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = dict(mixtral=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
                 deepseek_v3=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                  intermediate_size=96, moe_intermediate_size=16, n_routed_experts=8,
                                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
                                  topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=16,
                                  qk_nope_head_dim=16, v_head_dim=32))[family]
    cfg = tiny_config(family=family, model=dict(model, tie_word_embeddings=False), steps=6, eval_every=6,
                      ckpt_every=6, molae={"latent_dim": 16, "projections": ["gate", "up", "down"]})
    summary = T.train(cfg, data_dir, tmp_path / "run", progress=False)
    assert np.isfinite(summary["final_val_loss"])
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    if family == "deepseek_v3":
        bias = dict(m.named_buffers())["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert bias.abs().sum() > 0  # updated by the loss-free balancing rule
        assert "aux_loss" not in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[1])


DEEPSEEK_TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=96, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                     num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2, q_lora_rank=None,
                     kv_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)


@pytest.mark.parametrize("family,section", [
    ("qwen2_moe", None), ("qwen2_moe", {"latent_dim": 16, "groups": 2}), ("qwen2_moe", {"latent_moe_dim": 32}),
    ("deepseek_v3", None), ("deepseek_v3", {"latent_dim": 16, "projections": ["gate", "up", "down"], "groups": 4})])
def test_each_decoder_layer_compiles_into_one_graph(family, section):
    """`compile` compiles each decoder layer: a graph break inside (the experts' alignment check read data_ptr,
    which a traced tensor lacks) leaves it in pieces, each launched from Python, which is what the trainer's
    host time was spent on. Traced as the trainer runs it: bfloat16 autocast, the grouped_mm path."""
    from tiny import explain_last_layer

    cfg = tiny_config(family=family, model=DEEPSEEK_TINY if family == "deepseek_v3" else dict(TINY), molae=section)
    explained = explain_last_layer(T.build_model(cfg, 512))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_the_end_of_text_token_is_trained_and_a_window_starting_with_it_keeps_a_live_residual():
    """Token 0 (end-of-text) as pad id made it the embedding's padding_idx: a zero row, never trained, so a
    window starting with it carried an exactly zero residual row through every layer, whose gradient each
    RMSNorm multiplied by 1/sqrt(eps) (ref-deepseek-v3's non-finite steps). `model.pad_token_id=0` brings that back."""
    cfg = tiny_config(family="deepseek_v3", model=DEEPSEEK_TINY)
    ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(1, 512, (2, 15))], 1)

    def first_position(cfg):  # |residual| at position 0 after each layer, and token 0's embedding gradient
        model = T.build_model(cfg, 512)
        out = model(input_ids=ids, output_hidden_states=True)
        out.logits.float().pow(2).mean().backward()
        return [float(h[:, 0].abs().max()) for h in out.hidden_states], model.model.embed_tokens.weight.grad[0]

    live, grad = first_position(cfg)
    assert min(live) > 0 and grad.abs().max() > 0
    dead, grad = first_position(T.apply_overrides(cfg, ["model.pad_token_id=0"]))
    assert max(dead) == 0 and grad.abs().max() == 0


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_the_whole_model_compiles_into_at_most_two_graphs(family):
    """compile_scope=model: embedding to logits in one or two graphs (the host launches those, not one per
    layer plus the eager code between them), traced as the trainer runs it."""
    cfg = tiny_config(family=family, model=DEEPSEEK_TINY if family == "deepseek_v3" else dict(TINY))
    model = T.build_model(cfg, 512).train()
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(input_ids=torch.randint(0, 512, (2, 16)))
    assert explained.graph_count <= 2 and len(model.model.layers) >= 2, explained.break_reasons


def test_molae_groups_can_be_the_routers_groups():
    ds = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=96,
              moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
              first_k_dense_replace=1, n_group=4, topk_group=2, q_lora_rank=None, kv_lora_rank=16,
              qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)
    cfg = tiny_config(family="deepseek_v3", model=ds, molae={"latent_dim": 16, "groups": "routing"})
    model = T.build_model(cfg, 512)
    assert {m.groups for m in model.modules() if isinstance(m, Experts)} == {4}
    with pytest.raises(ValueError, match="has no routing groups"):
        T.build_model(tiny_config(molae={"latent_dim": 16, "groups": "routing"}), 512)
    with pytest.raises(ValueError, match="takes a whole number or 'routing'"):
        tiny_config(molae={"latent_dim": 16, "groups": "eight"})


def test_latent_moe_run_trains_and_loads(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(molae={"latent_moe_dim": 32}, steps=4, eval_every=4, ckpt_every=4)
    summary = T.train(cfg, data_dir, tmp_path / "run", progress=False)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert isinstance(m.model.layers[0].mlp.experts, LatentMoEExperts)
    val = T.validation_loss(m, D.TokenData(data_dir), cfg, T.Run("cpu"), contextlib.nullcontext)
    assert val == pytest.approx(summary["final_val_loss"], rel=1e-5)


def test_time_budget_sets_the_step_count_during_warmup(data_dir, tmp_path):
    cfg = tiny_config(steps=100000, warmup=12, time_budget_s=3.0, eval_every=10**6, ckpt_every=10**6)
    summary = T.train(cfg, data_dir, tmp_path / "run", progress=False)
    steps = summary["config"]["steps"]
    assert 12 < steps < 100000
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == steps


def write_config(path: Path, **kw) -> Path:
    from dataclasses import asdict

    path.write_text(json.dumps(asdict(tiny_config(**kw))))
    return path


def test_resume_after_kill_continues_the_same_loss_curve(data_dir, tmp_path):
    cfg = write_config(tmp_path / "cfg.json", steps=40, ckpt_every=5, eval_every=40)
    r = cli("train", "--config", cfg, "--data", data_dir, "--out", tmp_path / "full", "--no-progress")
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable, "-m", "molae.cli", "train", "--config", str(cfg), "--data", str(data_dir),
                             "--out", str(tmp_path / "killed"), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and max(losses(tmp_path / "killed"), default=0) >= 13):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = max(losses(tmp_path / "killed"))
    assert 13 <= done < 40, "the run was not killed midway"
    assert not (tmp_path / "killed" / "model").exists()
    ck = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert done - 5 <= ck["step"] <= done  # at most one interval lost
    r = cli("train", "--config", cfg, "--data", data_dir, "--out", tmp_path / "killed", "--no-progress")
    assert r.returncode == 2 and "--resume" in r.stderr  # refuses to overwrite a run
    r = cli("train", "--config", cfg, "--data", data_dir, "--out", tmp_path / "killed", "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 41))  # the log has each step once
    for step in range(1, 41):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), step
    a = json.loads((tmp_path / "full" / "summary.json").read_text())["final_val_loss"]
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())["final_val_loss"]
    assert b == pytest.approx(a, rel=1e-6)


def test_train_bad_input_is_one_line(data_dir, tmp_path):
    r = cli("train", "--config", "nope", "--data", data_dir, "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "neither a preset" in r.stderr
    r = cli("train", "--config", "demo", "--data", tmp_path, "--out", tmp_path / "o")
    assert r.returncode == 2 and "molae data prepare" in r.stderr
    r = cli("train", "--config", "demo", "--data", data_dir, "--out", tmp_path / "o", "--resume")
    assert r.returncode == 2 and "no checkpoint.pt" in r.stderr
    r = cli("train", "--config", "demo", "--data", data_dir, "--out", tmp_path / "o", "--set", "family=gpt2")
    assert r.returncode == 2 and "not supported" in r.stderr
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def two_processes(cfg: Path, data_dir: Path, out: Path, *extra):
    """`molae train` under torchrun with 2 gloo processes; fails the test with their stderr if it fails."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "molae.train",
                        "--config", str(cfg), "--data", str(data_dir), "--out", str(out), "--no-progress",
                        *map(str, extra)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]


def assert_same_curve(run: Path, ref: Path):
    """The two runs logged steps 1..6 with losses equal within 1e-4 relative."""
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-4), s


def test_fsdp2_two_gloo_processes_match_one_process_with_accumulation(data_dir, tmp_path):
    """Two FSDP2 processes (gloo, CPU) with micro-batches j = rank see the tokens one process sees with
    grad_accum 2 (j = micro): the loss curves agree to float tolerance."""
    cfg = write_config(tmp_path / "cfg.json", steps=6, ckpt_every=3, eval_every=6)
    two_processes(cfg, data_dir, tmp_path / "fsdp")
    r = cli("train", "--config", cfg, "--data", data_dir, "--out", tmp_path / "one", "--grad-accum", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert_same_curve(tmp_path / "fsdp", tmp_path / "one")
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["world"] == 2 and summary["tokens"] == 6 * 2 * 4 * 64
    assert (tmp_path / "fsdp" / "model" / "config.json").exists()
    # FSDP2 checkpoint and resume: stop after 3 steps (all warmup, so the lr does not depend on the total),
    # resume to 6 from the gathered checkpoint: the same curve.
    two_processes(cfg, data_dir, tmp_path / "part", "--steps", 3)
    two_processes(cfg, data_dir, tmp_path / "part", "--resume")
    assert_same_curve(tmp_path / "part", tmp_path / "one")


@pytest.mark.parametrize("section", [None, {"latent_dim": 16, "groups": 2, "projections": ["gate", "up", "down"]}],
                         ids=["standard", "molae-g2"])
def test_expert_parallel_training_matches_one_process(data_dir, tmp_path, section):
    """--ep 2 in two gloo processes (each MoE layer's experts split over them, FSDP2 for the rest) reproduces one
    process with grad_accum 2, step for step within 1e-4 relative in float32 (for the latent layer also across an
    EP checkpoint and --resume); the exported model holds every expert."""
    cfg = write_config(tmp_path / "cfg.json", steps=6, ckpt_every=3, eval_every=6, molae=section)
    two_processes(cfg, data_dir, tmp_path / "ep", "--ep", 2)
    r = cli("train", "--config", cfg, "--data", data_dir, "--out", tmp_path / "one", "--grad-accum", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert_same_curve(tmp_path / "ep", tmp_path / "one")
    # the gradients too (Adam would hide a constant factor in the losses): their logged norms agree
    norms = [{r["step"]: r["grad_norm"] for r in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())
              if "grad_norm" in r} for d in ("ep", "one")]
    assert sorted(norms[0]) == list(range(1, 7)) and norms[0] == pytest.approx(norms[1], rel=1e-4)
    summary = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ep", "one")]
    assert summary[0]["final_val_loss"] == pytest.approx(summary[1]["final_val_loss"], rel=1e-4)
    from safetensors.torch import load_file

    saved = load_file(str(next((tmp_path / "ep" / "model").glob("*.safetensors"))))
    ref = load_file(str(next((tmp_path / "one" / "model").glob("*.safetensors"))))
    assert saved.keys() == ref.keys()
    for k in saved:
        assert saved[k].shape == ref[k].shape, k
    if section is None:
        return  # resuming an EP checkpoint: once, on the layer with the most to gather (latent, 2 groups)
    part = tmp_path / "part"
    two_processes(cfg, data_dir, part, "--ep", 2, "--steps", 3)
    two_processes(cfg, data_dir, part, "--ep", 2, "--resume")
    assert_same_curve(part, tmp_path / "one")


def test_expert_parallel_needs_processes(data_dir, tmp_path):
    r = cli("train", "--config", "demo", "--data", data_dir, "--out", tmp_path / "o", "--ep", "2")
    assert r.returncode == 2 and "--ep 2 needs several processes" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_in_bf16_autocast(data_dir, tmp_path):
    cfg = tiny_config(steps=20, eval_every=20, ckpt_every=20, log_every=5, model=dict(TINY, hidden_size=128),
                      molae={"latent_dim": 32, "projections": ["gate", "up", "down"]})
    summary = T.train(cfg, data_dir, tmp_path / "run", device="cuda", progress=False)
    recs = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert recs[-1]["loss"] < recs[0]["loss"] and np.isfinite(summary["final_val_loss"])
    assert summary["device_name"] != "cpu" and summary["peak_flops"] > 1e13


def test_a_nonfinite_gradient_skips_the_update_and_is_logged(data_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = torch.nn.utils.get_total_norm

    def poisoned(grads, *args, **kw):
        grads = list(grads)
        calls["n"] += 1
        if calls["n"] == 3:  # step 3: one NaN in one gradient
            grads[5].view(-1)[0] = float("nan")
        return real(grads, *args, **kw)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", poisoned)
    summary = T.train(tiny_config(steps=6, eval_every=6, ckpt_every=6), data_dir, tmp_path / "run", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    bad = [r for r in recs if r.get("event") == "nonfinite_grad"]
    assert len(bad) == 1 and bad[0]["step"] == 3 and bad[0]["params"]["count"] == 1
    assert summary["skipped_steps"] == 1 and np.isfinite(summary["final_val_loss"])
    origin = [r for r in recs if r.get("event") == "nonfinite_origin"]
    assert len(origin) == 1 and origin[0]["reproduced"] is False  # planted after the backward: a re-run is clean


def test_the_first_nonfinite_step_is_located_where_the_backward_made_it(data_dir, tmp_path, monkeypatch):
    """A NaN planted in the backward of layer 1's attention output projection input, at step 3 and in its
    re-run: the locator names the modules around it, and no parameter above it has a non-finite gradient."""
    from molae.train import loop

    class Poison(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    calls = {"n": 0}
    real_build = loop.build_model

    def build_model(*args, **kw):
        model = real_build(*args, **kw)
        o_proj = model.model.layers[1].self_attn.o_proj

        def pre(module, args):
            calls["n"] += 1
            return (Poison.apply(args[0]),) if module.training and calls["n"] in (3, 4) else None
        o_proj.register_forward_pre_hook(pre)
        return model

    monkeypatch.setattr(loop, "build_model", build_model)
    summary = T.train(tiny_config(steps=5, eval_every=5, ckpt_every=5), data_dir, tmp_path / "run", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    bad = [r for r in recs if r.get("event") == "nonfinite_grad"]
    (origin,) = [r for r in recs if r.get("event") == "nonfinite_origin"]
    assert [r["step"] for r in bad] == [3] and summary["skipped_steps"] == 1
    assert origin["reproduced"] and origin["loss_finite"] and origin["forward_first_nonfinite"] is None
    assert origin["backward_last_finite_before"] in ("model.layers.1.self_attn.o_proj", "model.layers.1.self_attn")
    assert origin["backward_first_nonfinite"].startswith("model.layers.1.self_attn.")
    *_, last_finite, first_bad = origin["backward_trail"]  # o_proj's input gradient finite, then the planted NaN
    assert last_finite["name"] == "model.layers.1.self_attn.o_proj<" and last_finite["finite"]
    assert 0 < last_finite["absmax"] < 1e30 and not first_bad["finite"] and first_bad["absmax"] is None
    assert first_bad["name"].startswith("model.layers.1.self_attn.")
    assert origin["params"]["deepest"][-1].startswith("model.layers.1.")  # nothing above layer 1
    trail = [r["name"] for r in origin["backward_trail"]]  # the whole backward up to there, from the head down
    assert trail[0].startswith("lm_head") and all(r["finite"] for r in origin["backward_trail"][:-1])
    assert not any(n.startswith("model.layers.0.") for n in trail)
    fwd = [r["name"] for r in origin["forward_absmax"]]  # every module's output magnitude, in forward order
    assert fwd[0] == "model.embed_tokens" and "lm_head" in fwd
    assert all(r["absmax"] > 0 for r in origin["forward_absmax"])
    norms = [r for r in origin["forward_absmax"] if r["name"].endswith("layernorm")]
    assert len(norms) == 2 * 2 and all(r["input_min_rms"] > 0 and 0 <= r["position"] < 64 for r in norms)
    assert origin["params"]["first"][0] == "model.embed_tokens.weight" and np.isfinite(summary["final_val_loss"])


def test_profile_steps_write_the_kernel_table(data_dir, tmp_path):
    T.train(tiny_config(steps=5, eval_every=5, ckpt_every=5, profile_steps=2), data_dir, tmp_path / "run",
            progress=False)
    text = (tmp_path / "run" / "profile.txt").read_text()
    assert text.startswith("steps 4-5 (2 steps), sorted by self_") and "aten::" in text
    script = Path(__file__).parent.parent / "scripts" / "gpu" / "profile_report.py"  # the table of such runs
    r = subprocess.run([sys.executable, str(script), str(tmp_path), "--commit", "c0ffee", "--date", "2026-12-01",
                        "--device", "cpu"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "profile.json").read_text())["rows"][0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert row["preset"] == "run" and row["tokens_per_s"] == summary["tokens_per_s"] and row["gpu_busy"] is None
    assert row["cpu_ms_per_step_profiled"] > 0 and row["final_val_loss"] == summary["final_val_loss"]
    assert "| run | 256 |" in (tmp_path / "profile.md").read_text() and "c0ffee" in r.stdout


def test_reports_are_built_from_the_runs_files(data_dir, tmp_path):
    """reference / pretrain / scaling reports read every figure from real (tiny, CPU) runs' files."""
    from molae import experiments as X

    cfg = tiny_config(steps=4, eval_every=2, ckpt_every=4, log_every=2)
    summary = T.train(cfg, data_dir, tmp_path / "run", progress=False)
    assert cli("data", "bigram", data_dir, "--json", tmp_path / "run" / "bigram.json").returncode == 0
    ref = X.reference_report({"tiny": (tmp_path / "run", "abc1234")}, tmp_path / "res", "cpu", "2026-11-22", "cmd")
    row = ref["models"]["tiny"]
    assert row["final_val_loss"] == summary["final_val_loss"] and row["tokens"] == summary["tokens"]
    assert row["bigram"]["bigram_loss"] == json.loads((tmp_path / "run" / "bigram.json").read_text())["bigram_loss"]
    md = (tmp_path / "res" / "reference_models.md").read_text()
    assert f"{summary['final_val_loss']:.4f}" in md and (tmp_path / "res" / "reference_models.png").stat().st_size > 0
    lines = []
    for name, molae_spec in (("moe", None), ("molae-g1-all", {"latent_dim": 16, "projections": ["gate", "up", "down"]})):
        T.train(tiny_config(molae=molae_spec, steps=4, eval_every=2, ckpt_every=4), data_dir, tmp_path / name,
                progress=False)
        s = json.loads((tmp_path / name / "summary.json").read_text())
        lines.append(json.dumps(dict(s, variant=name, log=[json.loads(x) for x in
                                                          (tmp_path / name / "log.jsonl").read_text().splitlines()])))
    (tmp_path / "pre.jsonl").write_text("\n".join(lines) + "\n")
    pre = X.pretrain_report(tmp_path / "pre.jsonl", tmp_path / "res", "abc", "cpu", "2026-11-22", "cmd")
    small = pre["rows"][1]
    assert small["non_embedding_vs_moe"] < 1 and small["params"] == json.loads(lines[1])["params"]
    sc = [dict(json.loads(lines[0]), world=1, tokens_per_s=100.0), dict(json.loads(lines[0]), world=2, tokens_per_s=150.0)]
    (tmp_path / "sc.jsonl").write_text("\n".join(map(json.dumps, sc)) + "\n")
    res = X.scaling_report(tmp_path / "sc.jsonl", tmp_path / "res", "abc", "cpu", "2026-11-22", "cmd")
    assert res["rows"][1]["efficiency"] == pytest.approx(0.75)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Plants what transformers 5.17 does while dynamo traces (masking_utils._ignore_causal_mask_sdpa False: a
    boolean causal mask is built) and records each SDPA call as (no mask, is_causal)."""
    import transformers.masking_utils as MU

    monkeypatch.setattr(MU, "_ignore_causal_mask_sdpa", lambda *a, **k: False)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("family, compiled", [("qwen2_moe", False), ("qwen2_moe", True), ("deepseek_v3", False)])
def test_training_attention_is_causal_sdpa_without_a_mask_even_when_compiled_whole(family, compiled, sdpa_calls):
    """The mask transformers 5.17 builds whenever dynamo traces sent the model compiled whole to SDPA's
    memory-efficient kernel (64fc599, H200). With the plant (sdpa_calls) the family's own SDPA passes the mask,
    use_causal_sdpa passes none and is_causal=True, with the same logits."""
    from molae.train.model import use_causal_sdpa

    cfg = tiny_config(family=family, model=DEEPSEEK_TINY if family == "deepseek_v3" else dict(TINY))
    model = T.build_model(cfg, 512).eval()
    x = torch.randint(0, 512, (2, 16))
    masked = model(input_ids=x).logits
    assert sdpa_calls and set(sdpa_calls) == {(False, False)}  # the plant holds: a mask, not is_causal
    sdpa_calls.clear()
    use_causal_sdpa(model)
    torch._dynamo.reset()
    run = torch.compile(model, backend="eager") if compiled else model
    with torch.autocast("cpu", dtype=torch.bfloat16) if compiled else contextlib.nullcontext():
        causal = run(input_ids=x).logits
    assert sdpa_calls and set(sdpa_calls) == {(True, True)}
    torch.testing.assert_close(causal.float(), masked, **({"atol": 0.05, "rtol": 0.05} if compiled else {}))


def test_the_trainer_attends_without_a_mask(data_dir, tmp_path, sdpa_calls):
    """train() itself uses use_causal_sdpa (under the same plant)."""
    T.train(tiny_config(steps=1, eval_every=1, ckpt_every=1), data_dir, tmp_path / "r", progress=False)
    assert sdpa_calls and set(sdpa_calls) == {(True, True)}
