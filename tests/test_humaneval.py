"""HumanEval in the paper task folder (humaneval_instruct, pass@1): scoring of hand-made completions offline,
the unfinished-thinking rule, and the opt-in that model-written code needs (config, environment, lm-eval)."""

import pytest

from opd.studies import evaluate
from opd.worlds.paper import code_eval

DOC = {"task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
       "canonical_solution": "    return a + b\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


@pytest.fixture
def humaneval(repo, monkeypatch):
    """Our humaneval_instruct built by lm-eval from workflow/tasks/paper, its dataset replaced by DOC."""
    import datasets
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, name=None, **kw: datasets.DatasetDict({"test": datasets.Dataset.from_list([DOC])}))
    tm = TaskManager(include_path=str(repo / "workflow/tasks/paper"), include_defaults=False)
    return tm.load(["humaneval_instruct"])["tasks"]["humaneval_instruct"]


@pytest.mark.parametrize("response, expected", [
    ("    return a + b\n```\nThat adds them.", 1),          # correct; text after the closing fence ignored
    ("    return a * b\n```", 0),                            # wrong: 2 * 3 != 5
    ("    return a +\n```", 0),                              # does not parse
    ("<think>I will write return a + b", 0),                 # thinking never closed: 0, nothing runs
])
def test_pass_at_1_hand_made(humaneval, monkeypatch, response, expected):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    doc = next(iter(humaneval.eval_docs))
    assert humaneval.config.unsafe_code is True and humaneval.config.num_fewshot == 0
    assert humaneval.doc_to_text(doc).startswith("Write a solution to the following problem")
    assert humaneval.process_results(doc, [response]) == {"pass_at_1": expected}


def test_program_and_timeout(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    src = code_eval.program(DOC["prompt"], "    return a + b\n```\nmore", DOC["test"], "add")
    assert src == DOC["prompt"] + "    return a + b\n\n" + DOC["test"] + "\ncheck(add)\n"
    assert code_eval.passes(src)
    assert not code_eval.passes("while True:\n    pass\n", timeout=0.5)


def test_code_runs_only_with_the_switch(humaneval, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    doc = next(iter(humaneval.eval_docs))
    with pytest.raises(code_eval.CodeExecutionRefused, match="HF_ALLOW_CODE_EVAL=1"):
        humaneval.process_results(doc, ["    return a + b\n```"])
    # The unfinished-thinking rule needs no execution, so it scores without the switch.
    assert humaneval.process_results(doc, ["<think>return a + b"]) == {"pass_at_1": 0}


def test_switch_set_only_from_the_opt_in(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")  # inherited from the user's shell: not honoured
    evaluate.code_execution(False)
    assert "HF_ALLOW_CODE_EVAL" not in __import__("os").environ
    evaluate.code_execution(True)
    assert __import__("os").environ["HF_ALLOW_CODE_EVAL"] == "1"


def test_validation_refuses_code_tasks_without_the_opt_in(repo):
    config = {"evaluation": {"benchmarks": ["aime24", "humaneval_instruct", "mbpp"], "tasks_dir": "workflow/tasks/paper",
                             "allow_code_execution": False}}
    assert evaluate.code_execution_problems(config, repo) == [
        "evaluation.benchmarks[1]: 'humaneval_instruct' executes model-written code; set "
        "evaluation.allow_code_execution: true to allow it (docs/paper.md, 'HumanEval')",
        "evaluation.benchmarks[2]: 'mbpp' executes model-written code; set "
        "evaluation.allow_code_execution: true to allow it (docs/paper.md, 'HumanEval')"]
    config["evaluation"]["allow_code_execution"] = True
    assert evaluate.code_execution_problems(config, repo) == []
