"""`molae eval`: sliding-window perplexity against a direct per-token loop and HF's own loss,
the efficiency report against parameter counts and MOLAE.md §2's formulas, bad input."""

import json
import math
import random

import pytest
import torch

import molae  # noqa: F401
from molae.cli import main
from molae.data import byte_tokenizer
from molae.evaluate import efficiency, perplexity, windows
from molae.models import find_experts, to_molae
from tiny import tiny_model


@pytest.mark.parametrize("seed", range(5))
def test_windows_score_every_token_but_the_first_once(seed):
    rng = random.Random(seed * 7919 + int(torch.randint(0, 1000, ()).item()))
    T, C = rng.randint(2, 300), rng.randint(2, 64)
    S = rng.randint(1, C - 1)
    wins = windows(T, C, S)
    scored = [t for _, score_from, end in wins for t in range(score_from, end)]
    assert scored == list(range(1, T)), (T, C, S)
    for begin, score_from, end in wins:
        assert 0 <= begin < score_from <= end <= T and end - begin <= C
        assert score_from - begin >= min(C - S, score_from), (T, C, S)  # left context kept


def direct_nll(model, ids, context, stride):
    """Each token's NLL from its own forward pass over exactly the context the windows give it."""
    total = 0.0
    for begin, score_from, end in windows(len(ids), context, stride):
        for t in range(score_from, end):
            with torch.no_grad():
                logits = model(input_ids=ids[begin:t].unsqueeze(0)).logits[0, -1]
            total -= torch.log_softmax(logits.double(), -1)[ids[t]].item()
    return total


@pytest.mark.parametrize("context,stride,batch", [(16, 15, 4), (16, 5, 3), (40, 39, 1)])
def test_perplexity_matches_a_direct_loop(context, stride, batch):
    model = tiny_model("qwen2_moe")
    ids = torch.randint(0, 97, (53,))
    out = perplexity(model, ids, context, stride, batch_size=batch, progress=False)
    assert out["tokens"] == 52
    ref = direct_nll(model, ids, context, stride)
    assert math.isclose(out["nll_sum"], ref, rel_tol=1e-9)
    assert math.isclose(out["perplexity"], math.exp(ref / 52), rel_tol=1e-9)


def test_text_within_one_window_is_exp_of_hf_loss():
    model = tiny_model("mixtral")
    ids = torch.randint(0, 97, (30,))
    out = perplexity(model, ids, context=64, progress=False)
    with torch.no_grad():
        hf_loss = model(input_ids=ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss.item()  # mean NLL of 2..T
    assert math.isclose(out["perplexity"], math.exp(hf_loss), rel_tol=1e-6)  # HF's loss is float32


def expert_flops(n, m, k, latent, G):
    t = min(k, G)
    return sum(2 * n * latent[kind] * t + 2 * m * latent[kind] * k if kind in latent else 2 * n * m * k
               for kind in ("gate", "up", "down"))


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_efficiency_report(family):
    model = tiny_model(family)
    params = dict(model.named_parameters())
    experts = find_experts(model)
    k = model.config.num_experts_per_tok
    E, F2, D = experts[0][1].gate_up_proj.shape
    m = F2 // 2
    dense_flops = 2 * sum(p.numel() for n, p in params.items()
                          if p.dim() == 2 and ".experts." not in n and "embed_tokens" not in n)
    before = efficiency(model)
    assert before["total_params"] == sum(p.numel() for p in model.parameters())
    assert before["routed_expert_params"] == sum(p.numel() for n, p in params.items() if ".experts." in n)
    assert before["non_embedding_params"] == sum(p.numel() for n, p in params.items()
                                                 if "embed_tokens" not in n and not n.startswith("lm_head"))
    assert before["flops_per_token"] == dense_flops + len(experts) * 6 * D * m * k
    assert before["active_params"] == before["total_params"] - len(experts) * 3 * D * m * (E - k)
    a2a = before["all_to_all_bytes_per_token"]
    assert a2a["dispatch"] == a2a["standard_dispatch"] == len(experts) * k * D * 8  # float64 weights

    latent = {"gate": 6, "up": 5, "down": 4}
    to_molae(model, latent_dim=latent, groups=2, projections=("up", "gate", "down"))
    after = efficiency(model)
    assert after["total_params"] == sum(p.numel() for p in model.parameters())
    assert after["flops_per_token"] == dense_flops + len(experts) * expert_flops(D, m, k, latent, 2)
    a2a = after["all_to_all_bytes_per_token"]
    assert a2a["dispatch"] == len(experts) * k * (6 + 5) * 8 and a2a["combine"] == len(experts) * k * 4 * 8
    assert a2a["standard_combine"] == len(experts) * k * D * 8


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    model = tiny_model("qwen2_moe", dtype=torch.float32, vocab_size=256)  # the byte tokenizer's vocabulary
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def run(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_eval_cli_on_moe_and_converted_models(saved_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x\n" * 3)
    code, out = run(capsys, "eval", saved_model, "--text", text, "--context", 16, "--json", tmp_path / "moe.json")
    assert code == 0, out.err
    res = json.loads((tmp_path / "moe.json").read_text())
    r = res["texts"][0]
    assert r["tokens"] == len(text.read_bytes()) - 1 and r["bytes"] == len(text.read_bytes())
    assert math.isclose(r["bits_per_byte"], r["nll_sum"] / math.log(2) / r["bytes"])
    assert f"{r['perplexity']:.3f}" in out.out
    code, out = run(capsys, "convert", saved_model, "--out", tmp_path / "molae", "--latent-dim", 8)
    assert code == 0, out.err
    code, out = run(capsys, "eval", tmp_path / "molae", "--text", text, "--context", 16, "--json", tmp_path / "l.json")
    assert code == 0, out.err
    lat = json.loads((tmp_path / "l.json").read_text())
    assert lat["efficiency"]["routed_expert_params"] < res["efficiency"]["routed_expert_params"]
    assert lat["texts"][0]["tokens"] == r["tokens"] and lat["texts"][0]["mean_nll"] != r["mean_nll"]


def test_eval_bad_input(saved_model, tmp_path, capsys):
    empty, binary = tmp_path / "empty.txt", tmp_path / "bin.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"ok \xff\xfe bad")
    cases = [((tmp_path, "--text", empty), "is empty"),
             ((saved_model, "--text", binary), "is not UTF-8"),
             ((saved_model, "--text", tmp_path / "missing.txt"), "does not exist"),
             ((tmp_path, "--text", __file__), "is not a model: no config.json"),
             ((saved_model, "--text", __file__, "--context", 8, "--stride", 8), "stride=8 is out of range"),
             ((saved_model,), "nothing to evaluate")]
    for args, phrase in cases:
        code, out = run(capsys, "eval", *args)
        assert code == 2, (args, out.err)
        last = out.err.strip().splitlines()[-1]
        assert last.startswith("molae eval: error: ") and phrase in last, (args, last)
        assert "Traceback" not in out.err
