"""Downstream tasks through lm-eval (`simple_evaluate` on an in-memory `HFLM`).

Any lm-eval task name works where its data can be reached. Two tasks run offline from the
local GSM8K files (`DATA_DIR/gsm8k/{train,test}.jsonl`, e.g. ../shared/data):

  gsm8k_local     lm-eval's own gsm8k task (its prompt, answer filters and exact-match metric,
                  through `include:` of its YAML), reading the local files
  gsm8k_mc_local  multiple choice over the same test problems: the correct final answer and
                  the final answers of the next three problems with different answers, the
                  correct one at position i % 4; scored by log-likelihood (acc, acc_norm)

The YAML files are written into a temporary directory given to lm-eval's TaskManager.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

LOCAL_TASKS = ("gsm8k_local", "gsm8k_mc_local")


def final_answer(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")


def gsm8k_mc_docs(problems: list[dict]) -> list[dict]:
    """Four choices per problem: its final answer and the next problems' distinct other answers."""
    answers = [final_answer(p["answer"]) for p in problems]
    docs = []
    for i, p in enumerate(problems):
        wrong, j = [], i
        while len(wrong) < 3:
            j = (j + 1) % len(problems)
            if j == i:
                raise ValueError("gsm8k test data has fewer than 4 distinct answers: cannot build choices")
            if answers[j] != answers[i] and answers[j] not in wrong:
                wrong.append(answers[j])
        label = i % 4
        choices = wrong[:label] + [answers[i]] + wrong[label:]
        docs.append(dict(question=p["question"], choices=choices, label=label))
    return docs


def _gsm8k_dir(data_dir: Path | None) -> Path:
    if data_dir is None:
        raise ValueError("the local tasks read GSM8K from --data-dir DIR (DIR/gsm8k/test.jsonl), e.g. ../shared/data")
    d = Path(data_dir) / "gsm8k"
    for split in ("train", "test"):
        if not (d / f"{split}.jsonl").is_file():
            raise ValueError(f"--data-dir {data_dir}: {d / f'{split}.jsonl'} is missing")
    return d


def write_local_tasks(tmp: Path, data_dir: Path | None, names: list[str]):
    """YAML task files (and the multiple-choice data) for the local tasks asked for."""
    import lm_eval

    if not set(names) & set(LOCAL_TASKS):
        return
    d = _gsm8k_dir(data_dir).resolve()
    builtin = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    data_files = {"train": str(d / "train.jsonl"), "test": str(d / "test.jsonl")}
    (tmp / "gsm8k_local.yaml").write_text(json.dumps(dict(
        include=str(builtin), task="gsm8k_local", tag=[], dataset_path="json", dataset_name=None,
        dataset_kwargs=dict(data_files=data_files)), indent=2))  # JSON is YAML
    problems = [json.loads(line) for line in (d / "test.jsonl").read_text().splitlines() if line.strip()]
    mc = tmp / "gsm8k_mc.jsonl"
    mc.write_text("".join(json.dumps(doc) + "\n" for doc in gsm8k_mc_docs(problems)))
    (tmp / "gsm8k_mc_local.yaml").write_text(json.dumps(dict(
        task="gsm8k_mc_local", dataset_path="json", dataset_kwargs=dict(data_files=dict(test=str(mc))),
        test_split="test", output_type="multiple_choice", doc_to_text="Question: {{question}}\nAnswer:",
        doc_to_choice="{{choices}}", doc_to_target="{{label}}",
        metric_list=[dict(metric="acc", aggregation="mean", higher_is_better=True),
                     dict(metric="acc_norm", aggregation="mean", higher_is_better=True)],
        metadata=dict(version=1.0)), indent=2))


def run_tasks(model, tokenizer, names: list[str], data_dir: Path | None = None, limit: int | None = None,
              batch_size: int = 8, num_fewshot: int | None = None, device: str = "cpu") -> dict:
    """lm-eval results {task: {metric: value}} for `names`, on the model as it is in memory."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("--tasks needs lm-eval: pip install 'molae[eval]'") from None
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no BOS or EOS token, which lm-eval puts before each log-likelihood "
                         "request: set one (tokenizer.eos_token = ...) and save it with the model")
    with tempfile.TemporaryDirectory(prefix="molae-tasks-") as tmp:
        write_local_tasks(Path(tmp), data_dir, names)
        manager = TaskManager(include_path=tmp)
        unknown = [n for n in names if n not in manager.all_tasks and n not in getattr(manager, "all_groups", [])]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}: use lm-eval task names (`lm_eval ls tasks`) or the local "
                             f"tasks {', '.join(LOCAL_TASKS)}")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, backend="causal")
        try:
            out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False)
        except AssertionError as e:  # lm-eval checks its settings with asserts
            raise ValueError(f"lm-eval refused the settings: {str(e).strip().splitlines()[0]}") from None
        except (ConnectionError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"the data of task(s) {names} cannot be reached ({first}): offline, use "
                             f"{', '.join(LOCAL_TASKS)} with --data-dir") from None
    return {task: {k: float(v) for k, v in metrics.items() if k != "alias" and _is_number(v)}
            for task, metrics in out["results"].items()}


def _is_number(v) -> bool:
    try:
        float(v)
        return not isinstance(v, (str, bool))
    except (TypeError, ValueError):
        return False
