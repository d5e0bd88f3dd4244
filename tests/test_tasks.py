"""lm-eval tasks end to end on a tiny model (the numbers are meaningless; the plumbing is not),
from the shared GSM8K files, with the multiple-choice accuracy recomputed independently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import molae  # noqa: F401
from molae.data import byte_tokenizer
from molae.tasks import final_answer, gsm8k_mc_docs, run_tasks
from tiny import tiny_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir():
    if not (DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.fail(f"shared evaluation data missing: expected {DATA}/gsm8k/test.jsonl beside the repository")
    return DATA


@pytest.fixture(scope="module")
def problems(data_dir):
    return [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:200]]


def test_multiple_choice_docs(problems):
    docs = gsm8k_mc_docs(problems)
    for i, (p, doc) in enumerate(zip(problems, docs)):
        assert doc["question"] == p["question"] and len(doc["choices"]) == 4
        assert len(set(doc["choices"])) == 4 and doc["label"] == i % 4
        assert doc["choices"][doc["label"]] == final_answer(p["answer"])
    assert final_answer("so 3 + 4 = 7\n#### 1,234") == "1234"


def loglik(model, ids_context, ids_cont):
    ids = torch.tensor(ids_context + ids_cont)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None, :-1]).logits[0].double(), -1)
    return sum(logp[len(ids_context) - 1 + j, t].item() for j, t in enumerate(ids_cont))


def test_tasks_run_offline_and_mc_accuracy_is_recomputed(data_dir, problems):
    model = tiny_model("qwen2_moe", dtype=torch.float32, vocab_size=256, max_position_embeddings=1024)
    tok = byte_tokenizer()
    n = 8
    res = run_tasks(model, tok, ["gsm8k_mc_local", "gsm8k_local"], data_dir=data_dir, limit=n, batch_size=4,
                    num_fewshot=0)
    assert set(res) == {"gsm8k_mc_local", "gsm8k_local"}
    assert res["gsm8k_local"]["sample_len"] == n and 0 <= res["gsm8k_local"]["exact_match,strict-match"] <= 1
    correct = correct_norm = 0
    for doc in gsm8k_mc_docs(problems)[:n]:
        ctx = list(f"Question: {doc['question']}\nAnswer:".encode())
        scores = [loglik(model, ctx, list(f" {c}".encode())) for c in doc["choices"]]
        norm = [s / len(c) for s, c in zip(scores, doc["choices"])]  # per character of the choice, as lm-eval
        correct += max(range(4), key=scores.__getitem__) == doc["label"]
        correct_norm += max(range(4), key=norm.__getitem__) == doc["label"]
    assert res["gsm8k_mc_local"]["acc,none"] == pytest.approx(correct / n)
    assert res["gsm8k_mc_local"]["acc_norm,none"] == pytest.approx(correct_norm / n)


def test_task_errors(data_dir, tmp_path):
    model, tok = tiny_model("mixtral", dtype=torch.float32, vocab_size=256), byte_tokenizer()
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['no_such_task'\]"):
        run_tasks(model, tok, ["no_such_task"])
    with pytest.raises(ValueError, match=r"the local tasks read GSM8K from --data-dir"):
        run_tasks(model, tok, ["gsm8k_mc_local"])
    with pytest.raises(ValueError, match=r"gsm8k/train.jsonl is missing"):
        run_tasks(model, tok, ["gsm8k_local"], data_dir=tmp_path)
    tok.eos_token = None
    with pytest.raises(ValueError, match=r"no BOS or EOS token"):
        run_tasks(model, tok, ["gsm8k_mc_local"], data_dir=data_dir)


def test_unreachable_task_data_offline(tmp_path):
    path = tmp_path / "m"
    tiny_model("olmoe", dtype=torch.float32, vocab_size=256).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "molae.cli", "eval", str(path), "--tasks", "arc_easy", "--limit", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("molae eval: error: the data of task(s) ['arc_easy'] cannot be reached"), last
    assert "gsm8k_local" in last
