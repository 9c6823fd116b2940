"""The paper study's lm-eval tasks: our YAMLs load offline, the built-in names we rely on exist, and the
answer checker agrees with hand-worked examples. Nothing here downloads: datasets are replaced by rows."""

import importlib.util
import re

import pytest

from opd.worlds.paper import checker, dapo

# The checker needs math-verify (pinned in envs/eval.yaml); only the tests that score answers need it.
needs_math_verify = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                                       reason="math-verify is not installed")

PAPER_TASKS = ("amc23", "olympiadbench")
# The built-in lm-eval 0.4.13 tasks the paper study evaluates on (docs/paper.md says why these variants).
BUILTIN_TASKS = ("minerva_math500", "aime24", "aime25", "gpqa_diamond_cot_zeroshot", "ifeval")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def paper_dir(request):
    return request.config.rootpath / "workflow" / "tasks" / "paper"


@pytest.fixture(scope="module")
def utils(paper_dir):
    spec = importlib.util.spec_from_file_location("paper_task_utils", paper_dir / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_index_offline(paper_dir):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(paper_dir), include_defaults=False)
    assert set(PAPER_TASKS) <= set(tm.all_subtasks)
    assert {"paper", "paper_in_domain"} <= set(tm.all_tags)
    for name in PAPER_TASKS:
        assert tm.task_index[name].yaml_path.parent == paper_dir


def test_builtin_task_names_exist():
    from lm_eval.tasks import TaskManager

    assert set(BUILTIN_TASKS) <= set(TaskManager().all_subtasks)


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_config(paper_dir, utils, name):
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(paper_dir / f"{name}.yaml")
    assert cfg["task"] == name and cfg["output_type"] == "generate_until"
    assert cfg["metadata"]["version"] == 1.0 and cfg["num_fewshot"] == 0
    assert re.fullmatch(r"[0-9a-f]{40}", cfg["dataset_kwargs"]["revision"])  # pinned to a hub commit
    assert cfg["process_results"].__name__ == "process_results"
    # Distilled and evaluated on the same instruction.
    assert cfg["doc_to_text"].endswith("\n" + dapo.BOXED_INSTRUCTION)
    gen = cfg["generation_kwargs"]
    assert (gen["temperature"], gen["top_p"], gen["top_k"], gen["max_gen_toks"]) == (0.6, 0.95, 20, 32768)


AMC_ROWS = [
    {"id": 1, "problem": "What is $1/2+1/4$ of 4?", "answer": 3.0,
     "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12A_Problems/Problem_1"},
    {"id": 2, "problem": "An old one.", "answer": 5.0,
     "url": "https://artofproblemsolving.com/wiki/index.php/2022_AMC_12B_Problems/Problem_2"},
    {"id": 3, "problem": "A half.", "answer": 2.5,
     "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12B_Problems/Problem_3"},
]
OLY_ROWS = [
    {"id": 7, "question": "Find $x$.", "final_answer": ["$\\frac{\\sqrt{2}}{2}$"], "unit": None},
    {"id": 8, "question": "Find all $n$.", "final_answer": ["$1$", "$2$"], "unit": None},
]


@pytest.fixture
def tasks(paper_dir, monkeypatch):
    """Both tasks built by lm-eval with the hub replaced by the rows above; records the load calls."""
    import datasets
    from lm_eval.tasks import TaskManager

    calls = []

    def fake_load(path, name=None, **kwargs):
        calls.append((path, name, kwargs.get("revision")))
        rows = AMC_ROWS if path == "AI-MO/aimo-validation-amc" else OLY_ROWS
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    tm = TaskManager(include_path=str(paper_dir), include_defaults=False)
    return tm.load(list(PAPER_TASKS))["tasks"], calls


@needs_math_verify
def test_tasks_build_offline(tasks):
    built, calls = tasks
    assert sorted(c[:2] for c in calls) == [("AI-MO/aimo-validation-amc", None),
                                             ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP")]
    assert all(re.fullmatch(r"[0-9a-f]{40}", c[2]) for c in calls)
    amc = list(built["amc23"].test_docs())
    assert [d["id"] for d in amc] == [1, 3]  # AMC 12 2022 dropped
    assert [built["amc23"].doc_to_target(d) for d in amc] == ["3", "2.5"]
    assert built["amc23"].doc_to_text(amc[0]) == "What is $1/2+1/4$ of 4?\n" + dapo.BOXED_INSTRUCTION
    oly = list(built["olympiadbench"].test_docs())
    assert [built["olympiadbench"].doc_to_target(d) for d in oly] == ["\\frac{\\sqrt{2}}{2}", "1, 2"]
    task = built["olympiadbench"]
    assert task.process_results(oly[0], ["<think>...</think>So $x=\\boxed{\\frac{1}{\\sqrt{2}}}$."]) == \
        {"exact_match": 1}
    assert task.process_results(oly[1], ["\\boxed{2, 1}"]) == {"exact_match": 1}
    assert built["amc23"].process_results(amc[0], ["\\boxed{3.0}"]) == {"exact_match": 1}


@pytest.mark.parametrize("response, reference, expected", [
    ("so the answer is \\boxed{3/4}.", "0.75", 1),                       # fraction vs decimal
    ("$\\boxed{\\frac{3}{4}}$", "0.75", 1),                              # nested braces
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "$\\frac{\\sqrt 2}{2}$", 1),       # nested braces, $..$ reference
    ("The answer is 3/4.", "0.75", 0),                                   # no box: no answer
    ("\\boxed{}", "0", 0),                                               # empty box
    ("\\boxed{3/4", "0.75", 0),                                          # box cut off
    ("\\boxed{1} at first, then \\boxed{3/4}", "0.75", 1),               # the last box counts
    ("\\boxed{3/4} at first, then \\boxed{1}", "0.75", 0),
    ("<think>maybe \\boxed{3/4}", "0.75", 0),                            # thinking never finished
    ("<think>\\boxed{1}</think>\n\nFinal: \\boxed{3/4}", "0.75", 1),     # only after </think>
    ("<think>\\boxed{3/4}</think>\n\nFinal: \\boxed{1}", "0.75", 0),
    ("\\fbox{12}", "12", 1),
    ("so \\boxed 12 it is", "12", 1),                                    # brace-less box
    ("\\boxed{013}", "12", 0),
    ("\\boxed{x = 3}", "3", 1),
    ("\\boxed{2, 1}", "1, 2", 1),                                        # answer sets
    ("\\boxed{x^2+1}", "1+x^2", 1),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1),                    # identical text
])
@needs_math_verify
def test_process_results_hand_worked(utils, response, reference, expected):
    assert utils.process_results({"reference": reference}, [response]) == {"exact_match": expected}


def test_extraction_helpers(utils):
    assert checker.last_boxed("a \\boxed{\\frac{a}{b}^{2}} b") == "\\frac{a}{b}^{2}"
    assert checker.last_boxed("no box here") is None
    assert checker.final_response("plain") == "plain"
    assert checker.final_response("<think>a</think>b</think>c") == "c"
    assert checker.final_response("<think>a") is None
    assert checker.final_response("no tags at all") == "no tags at all"
    assert checker.strip_dollars(" $$x$$ ") == "x"
    assert (utils.format_number(3.0), utils.format_number(2.5), utils.format_number(" 7 ")) == ("3", "2.5", "7")


# Every task of paper.yaml (config/paper.yaml evaluation.benchmarks), built from our YAMLs with hand-made rows.
TABLE_TASKS = ("minerva_math500", "aime24", "aime25", "amc23", "olympiadbench", "gpqa_diamond_cot_zeroshot", "ifeval")
TABLE_ROWS = {
    "Maxwell-Jia/AIME_2024": [{"ID": "2024-I-1", "Problem": "Find 3+4.", "Answer": "7", "Solution": "7"}],
    "math-ai/aime25": [{"id": "0", "problem": "Find 3+4.", "answer": "7"}],
    "HuggingFaceH4/MATH-500": [{"problem": "Find 3+4.", "solution": "So $\\boxed{7}$.", "answer": "7",
                                "subject": "Algebra", "level": 1, "unique_id": "x"}],
    "AI-MO/aimo-validation-amc": [{"id": 1, "problem": "Find 3+4.", "answer": 7.0,
                                   "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12A_Problems/Problem_1"}],
    "Hothan/OlympiadBench": [{"id": 7, "question": "Find 3+4.", "final_answer": ["$7$"], "unit": None}],
    "Idavidrein/gpqa": [{"Question": "Which is 7?", "Correct Answer": "seven", "Incorrect Answer 1": "one",
                         "Incorrect Answer 2": "two", "Incorrect Answer 3": "three"}],
}


@pytest.fixture
def table_tasks(paper_dir, monkeypatch):
    import datasets
    from lm_eval.tasks import TaskManager

    def fake_load(path, name=None, **kwargs):
        return datasets.DatasetDict({s: datasets.Dataset.from_list(TABLE_ROWS[path]) for s in ("train", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    tm = TaskManager(include_path=str(paper_dir), include_defaults=False)
    return tm.load([t for t in TABLE_TASKS if t != "ifeval"])["tasks"]  # ifeval's checks need langdetect


def _table_score(task, doc: dict, response: str) -> int:
    """The task's headline metric (config/paper.yaml evaluation.metrics) for one response, as lm-eval scores it."""
    if task.config.filter_list:  # gpqa: filters, then exact_match against the target letter
        from lm_eval.api.instance import Instance

        inst = Instance("generate_until", doc, ("", {}), 0)
        inst.resps = [response]
        flexible = next(f for f in task._filters if f.name == "flexible-extract")
        flexible.apply([inst])
        return int(inst.filtered_resps["flexible-extract"] == task.doc_to_target(doc))
    metric = "math_verify" if task.config.task == "minerva_math500" else "exact_match"
    return int(task.process_results(doc, [response])[metric])


@needs_math_verify
def test_unfinished_thinking_scores_zero_on_every_paper_task(paper_dir, table_tasks):
    import yaml

    benchmarks = yaml.safe_load((paper_dir.parents[2] / "config/paper.yaml").read_text())["evaluation"]["benchmarks"]
    assert tuple(benchmarks) == TABLE_TASKS
    for name, task in table_tasks.items():
        assert task.config.metadata["version"] >= 1.0
        # One doc per task: gpqa's process_docs shuffles the choices again on every read.
        doc = next(iter(task.eval_docs))
        if name.startswith("gpqa"):  # the letter of "seven" after the shuffle
            right = f"The answer is {task.doc_to_target(doc)}."
        else:
            right = "So the answer is $\\boxed{7}$."
        # A correct answer written mid-reasoning, thinking never closed: 0 on every task.
        assert _table_score(task, doc, f"<think>Let me see. {right} Hmm, but wait") == 0, name
        # The same answer after a closed trace counts (lm-eval's hf backend keeps the trace, vllm drops it).
        assert _table_score(task, doc, f"<think>Let me see.</think>\n\n{right}") == 1, name
        assert _table_score(task, doc, right) == 1, name


def test_unfinished_rule_on_an_ifeval_like_scorer(utils):
    # ifeval's scorer needs langdetect (envs/eval.yaml); the wrapper is the same for every built-in.
    def builtin(doc, results):
        return {"prompt_level_strict_acc": True, "inst_level_strict_acc": [True, True], "score": 1.0,
                "seen": results[0]}

    zero = utils.unfinished_scores_zero(builtin, {}, ["<think>I will answer in lowercase"])
    assert zero == {"prompt_level_strict_acc": False, "inst_level_strict_acc": [False, False], "score": 0,
                    "seen": 0}
    assert utils.unfinished_scores_zero(builtin, {}, ["<think>x</think>\n\n done"])["seen"] == "done"
    assert utils.unfinished_scores_zero(builtin, {}, [" no tags"])["seen"] == " no tags"
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(paper_dir_of(utils) / "ifeval.yaml")
    assert cfg["task"] == "ifeval" and cfg["process_results"].__name__ == "process_results_ifeval"
    assert cfg["metadata"]["version"] == 5.0


def paper_dir_of(utils):
    from pathlib import Path

    return Path(utils.__file__).parent


def test_unfinished_counts_and_rate(tmp_path):
    from opd.infra.lmeval_results import THINKING_KEY, read_unfinished_rate, thinking_counts

    counts = thinking_counts(["<think>a", "b", "<think>c</think>d", "<think>e"], thinking_mode=True)
    assert counts == {"thinking_mode": True, "responses": 4, "opened": 3, "unfinished": 2}
    path = tmp_path / "t.json"
    path.write_text(__import__("json").dumps({THINKING_KEY: counts}))
    assert read_unfinished_rate(path) == 0.5
    path.write_text(__import__("json").dumps({THINKING_KEY: thinking_counts(["a", "b"], thinking_mode=False)}))
    assert read_unfinished_rate(path) is None  # no thinking at all: the report leaves it out
