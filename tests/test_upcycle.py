"""Upcycling ([10]): an MoE run started from a trained dense model of the same family (molae/train/upcycle.py)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

import molae  # noqa: F401  (registers the molae_* model types)
from molae import train as T
from molae.layers import Experts
from molae.train.upcycle import check_configs, load_dense_state, partition_ffn, upcycle

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             tie_word_embeddings=False)


def random_dense(family_config: str, model_class: str, tmp_path, seed=0, **kw):
    """A dense model with every weight random, saved to disk (what --upcycle-from reads)."""
    cfg = getattr(transformers, family_config)(vocab_size=97, **{**SHAPE, **kw})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "dense")
    return model


def moe_config(family, model, **kw) -> T.TrainConfig:
    return T.TrainConfig(name="up", family=family, model={**SHAPE, **model}, upcycle=dict(reinit=0.0, **kw),
                         seq_len=16, batch_size=2, steps=2, warmup=1, eval_tokens=64)


@pytest.mark.parametrize("family,dense,moe", [
    ("qwen2_moe", ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(intermediate_size=64, mlp_only_layers=[0, 1])),
     dict(intermediate_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=0, num_experts=4,
          num_experts_per_tok=2, norm_topk_prob=True)),
    ("mixtral", ("MistralConfig", "MistralForCausalLM", dict(intermediate_size=64, sliding_window=None,  # Mixtral
                                                             rms_norm_eps=1e-5, rope_parameters=dict(  # from Mistral
                                                                 rope_theta=1e6, rope_type="default"))),
     dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
])
def test_experts_that_are_whole_copies_reproduce_the_dense_model(family, dense, moe, tmp_path):
    """Every expert a full copy of the dense FFN (shuffled: the same function), renormalised top-k weights, no
    shared expert: the upcycled model's logits are the dense model's, whatever the fresh router routes."""
    ref = random_dense(dense[0], dense[1], tmp_path, **dense[2])
    model = T.build_model(moe_config(family, moe), 97).eval()
    state, dense_config = load_dense_state(str(tmp_path / "dense"))
    check_configs(dense_config, model.config)
    info = upcycle(model, family, state, shuffle=True, reinit=0.0, seed=1)
    assert info["initialised"] and all(".mlp.gate" in n or "shared_expert_gate" in n for n in info["initialised"])
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
    e = model.model.layers[0].mlp.experts
    assert not torch.equal(e.gate_proj[0], e.gate_proj[1])  # each copy has its own neuron order


def test_the_dense_model_is_read_a_tensor_at_a_time_and_a_tied_head_from_the_embedding(tmp_path, monkeypatch):
    """Upcycling holds one dense tensor at a time beside the MoE (its memory does not grow with the depth): every
    read is of one tensor, none twice; with tied embeddings the head is the embedding."""
    from molae.checkpoint import SourceCheckpoint

    ref = random_dense("Qwen2Config", "Qwen2ForCausalLM", tmp_path, intermediate_size=64, tie_word_embeddings=True)
    reads, read = [], SourceCheckpoint.read
    monkeypatch.setattr(SourceCheckpoint, "read", lambda self, keys, device=None: reads.append(list(keys)) or
                        read(self, keys, device))
    state, _ = load_dense_state(str(tmp_path / "dense"))
    assert reads == [] and "lm_head.weight" in state and "lm_head.weight" not in state.ckpt.keys()
    torch.testing.assert_close(state["lm_head.weight"], ref.lm_head.weight.float())
    reads.clear()
    moe = dict(intermediate_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=0, num_experts=4,
               num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=True)
    model = T.build_model(moe_config("qwen2_moe", moe), 97).eval()
    upcycle(model, "qwen2_moe", state, reinit=0.0)
    flat = [k for r in reads for k in r]
    assert all(len(r) == 1 for r in reads) and len(flat) - len(set(flat)) <= 1  # (the tied head: the embedding)
    assert set(flat) == set(state.ckpt.keys())


def dense_ffn_out(x, gate_FD, up_FD, down_DF):
    return (F.silu(x @ gate_FD.T) * (x @ up_FD.T)) @ down_DF.T


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_copy_of_each_fine_grained_partition_sums_to_the_dense_ffn(shuffle):
    g = torch.Generator().manual_seed(0)
    D, F_, P, C = 24, 48, 4, 3  # F = P * M, E = C * P
    gate, up, down = torch.randn(F_, D, dtype=torch.float64), torch.randn(F_, D, dtype=torch.float64), \
        torch.randn(D, F_, dtype=torch.float64)
    parts = partition_ffn(gate, up, down, n_experts=C * P, inter=F_ // P, shared=F_, shuffle=shuffle, reinit=0.0, g=g)
    experts = Experts(D, F_ // P, C * P).double()
    experts.impl = "reference"
    with torch.no_grad():
        for kind in ("gate", "up", "down"):
            getattr(experts, f"{kind}_proj").copy_(parts[kind])
    x = torch.randn(10, D, dtype=torch.float64)
    want = dense_ffn_out(x, gate, up, down)
    for c in range(C):  # the P experts of copy c, each with routing weight 1
        idx = torch.arange(c * P, (c + 1) * P).expand(10, P)
        torch.testing.assert_close(experts(x, idx, torch.ones(10, P, dtype=torch.float64)), want)
    torch.testing.assert_close(dense_ffn_out(x, parts["shared_gate"], parts["shared_up"], parts["shared_down"]), want)
    if shuffle:  # copies differ in which neurons share an expert
        assert not torch.equal(parts["gate"][0], parts["gate"][P])


def test_reinit_draws_that_fraction_of_each_experts_neurons_afresh():
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(32, 8), torch.randn(32, 8), torch.randn(8, 32)
    parts = partition_ffn(gate, up, down, n_experts=4, inter=16, shared=0, shuffle=False, reinit=0.5, g=g)
    for e in range(4):  # unshuffled: expert e = copy e // 2, neurons 16 * (e % 2) + [0, 16)
        rows = slice(16 * (e % 2), 16 * (e % 2) + 16)
        kept = [(parts[k][e] == w[rows]).all(1) for k, w in (("gate", gate), ("up", up))]
        kept.append((parts["down"][e] == down[:, rows]).all(0))
        assert torch.equal(kept[0], kept[1]) and torch.equal(kept[0], kept[2])  # whole neurons: rows and column
        assert int(kept[0].sum()) == 8
    assert "shared_gate" not in parts


def test_partitions_that_do_not_fit_are_one_line_errors():
    g = torch.Generator()
    w = torch.randn(48, 8)
    with pytest.raises(ValueError, match="not a multiple of the experts' 20"):
        partition_ffn(w, w, w.T, n_experts=4, inter=20, shared=0, shuffle=True, reinit=0.0, g=g)
    with pytest.raises(ValueError, match="not whole copies of the dense FFN's 4 partitions"):
        partition_ffn(w, w, w.T, n_experts=6, inter=12, shared=0, shuffle=True, reinit=0.0, g=g)
    with pytest.raises(ValueError, match="shared expert's 64 neurons exceed"):
        partition_ffn(w, w, w.T, n_experts=4, inter=12, shared=64, shuffle=True, reinit=0.0, g=g)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "molae.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_molae_train_upcycles_a_dense_run_and_continues(data_dir, tmp_path):
    """`molae train --config dense.json`, then the MoE `--upcycle-from` its model/: the MoE starts near the dense
    model's loss (far below a fresh MoE's), records where it came from, and trains on."""
    common = dict(seq_len=64, batch_size=4, warmup=2, log_every=1, eval_every=8, ckpt_every=8, eval_tokens=2048,
                  lr=3e-3, family="qwen2_moe")
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=128,
                 num_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
    (tmp_path / "dense.json").write_text(json.dumps(dict(name="dense", steps=40, **common,
                                                         model={**shape, "mlp_only_layers": [0, 1]})))
    (tmp_path / "moe.json").write_text(json.dumps(dict(name="moe", steps=8, **common, model=shape,
                                                       upcycle=dict(shuffle=True, reinit=0.5))))
    r = cli("train", "--config", tmp_path / "dense.json", "--data", data_dir, "--out", tmp_path / "dense",
            "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    dense = json.loads((tmp_path / "dense" / "summary.json").read_text())
    assert dense["params"]["routed_experts"] == 0
    r = cli("train", "--config", tmp_path / "moe.json", "--data", data_dir, "--out", tmp_path / "cold",
            "--no-progress", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--upcycle-from DIR" in r.stderr
    assert not (tmp_path / "cold").exists()
    r = cli("train", "--config", tmp_path / "moe.json", "--data", data_dir, "--out", tmp_path / "up",
            "--upcycle-from", tmp_path / "dense" / "model", "--no-progress", "--device", "cpu", "--export-at", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "up" / "model-step4")  # --export-at 0.5
    assert type(half).__name__ == "Qwen2MoeForCausalLM"
    assert '"event": "export"' in (tmp_path / "up" / "log.jsonl").read_text()
    r = cli("train", "--config", tmp_path / "moe.json", "--data", data_dir, "--out", tmp_path / "scratch",
            "--set", "upcycle=null", "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    up = json.loads((tmp_path / "up" / "summary.json").read_text())
    assert up["upcycle"]["dense_run"]["tokens"] == dense["tokens"] and up["upcycle"]["reinit"] == 0.5
    assert up["upcycle"]["from_ffn"] == 2 * 6  # 2 layers x (gate, up, down of the experts and the shared expert)
    first = lambda run: next(json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()  # noqa: E731
                             if "loss" in json.loads(x))
    cold_start = first(tmp_path / "scratch")
    assert first(tmp_path / "up") < cold_start - 0.5  # it starts trained
    assert up["final_val_loss"] < json.loads((tmp_path / "scratch" / "summary.json").read_text())["final_val_loss"]
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "up" / "model")
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"  # a standard MoE in the family's own classes


def test_a_dense_model_of_other_shapes_is_a_one_line_error(data_dir, tmp_path):
    random_dense("Qwen2MoeConfig", "Qwen2MoeForCausalLM", tmp_path, intermediate_size=64, mlp_only_layers=[0, 1])
    cfg = dict(name="moe", family="qwen2_moe", steps=2, seq_len=16, batch_size=2, warmup=1, eval_tokens=64,
               model={**SHAPE, "hidden_size": 48, "moe_intermediate_size": 16, "num_experts": 4,
                      "shared_expert_intermediate_size": 16}, upcycle={})
    (tmp_path / "moe.json").write_text(json.dumps(cfg))
    r = cli("train", "--config", tmp_path / "moe.json", "--data", data_dir, "--out", tmp_path / "o",
            "--upcycle-from", tmp_path / "dense", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "the dense model's tensor is" in r.stderr and "same tokenizer" in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_dense_model_that_computes_differently_is_named():
    from transformers import MistralConfig, MixtralConfig

    with pytest.raises(ValueError, match=r"rope_parameters is .*--set 'model.rope_parameters="):
        check_configs(MistralConfig(sliding_window=None).to_dict(), MixtralConfig())
    check_configs(MistralConfig(sliding_window=None, rms_norm_eps=1e-5, rope_parameters=dict(
        rope_theta=1e6, rope_type="default")).to_dict(), MixtralConfig())  # the same: no error
