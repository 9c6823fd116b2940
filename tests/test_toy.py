import random
import re
from pathlib import Path

import pytest
import yaml

from opd.worlds.miniature import generator as toy


def test_same_seed_same_problems_other_seed_others():
    a = toy.generate("arith3", 20, seed=0, split="test")
    b = toy.generate("arith3", 20, seed=0, split="test")
    c = toy.generate("arith3", 20, seed=1, split="test")
    assert a == b
    assert a != c


def test_world_files_are_deterministic(tmp_path):
    toy.build_world(tmp_path / "x", 10, 50, 20, seed=3, ood_fraction=0.2)
    toy.build_world(tmp_path / "y", 10, 50, 20, seed=3, ood_fraction=0.2)
    for name in ["arith1.jsonl", "reverse.jsonl", "sft.jsonl", "train_prompts.jsonl"]:
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


def test_hand_worked_problem():
    # Replaying the generator's choices by hand: start 7, then the solution must chain exactly.
    prob = toy.make_arith(random.Random(0), 3)
    steps = re.findall(r"(\d+) (plus|minus|times) (\d+) is (\d+)\.", prob["solution"])
    assert len(steps) == 3
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    for i, (a, op, b, result) in enumerate(steps):
        assert ops[op](int(a), int(b)) == int(result)
        if i:
            assert int(a) == int(steps[i - 1][3])  # each step starts from the previous result
    assert prob["answer"] == steps[-1][3]
    assert prob["question"].startswith(f"Start with {steps[0][0]}.")


@pytest.mark.parametrize("task", toy.IN_DOMAIN)
def test_chains_have_rising_length_and_stay_in_range(task):
    for prob in toy.generate(task, 30, seed=0, split="test", max_value=30):
        numbers = [int(x) for x in re.findall(r"\d+", prob["solution"])]
        assert all(0 <= x <= 30 for x in numbers)
        # L operations -> L step sentences, then the answer sentence, then optional chatter
        steps = re.findall(r"\d+ (?:plus|minus|times) \d+ is \d+\.", prob["solution"])
        assert len(steps) == toy.chain_length(task)
        assert prob["solution"].index(f"The answer is {prob['answer']}.") > prob["solution"].index(steps[-1])


def test_chatter_is_free_choice_and_optional():
    rng = random.Random(0)
    chatter = [toy.make_chatter(rng) for _ in range(400)]
    assert 0.1 < sum(c == "" for c in chatter) / 400 < 0.3  # 1 - CHATTER_PROB = 0.2
    assert len(set(chatter)) > 20
    assert all(c == "" or (c.startswith(" ") and c.endswith(".") and "answer" not in c) for c in chatter)


def test_reverse_problem():
    prob = toy.make_reverse(random.Random(1))
    digits = prob["question"].removeprefix("Reverse the digits ").rstrip(".").split()
    assert prob["answer"] == "".join(reversed(digits))


def test_answer_checker():
    assert toy.extract_answer("3 plus 4 is 7. The answer is 7.") == "7"
    assert toy.extract_answer("The answer is -3. The answer is 5.") == "-3"  # the first one counts
    assert toy.extract_answer("no final sentence") is None
    assert toy.is_correct("... The answer is 12.", "12")
    assert not toy.is_correct("... The answer is 121.", "12")
    assert not toy.is_correct("... the answer is 12.", "12")  # the format is part of the skill


def test_benchmarks_disjoint_from_training_sets(tmp_path):
    toy.build_world(tmp_path, 40, 400, 100, seed=0, ood_fraction=0.2)
    from opd.infra.io import read_jsonl

    bench = {r["question"] for t in toy.BENCHMARKS for r in read_jsonl(tmp_path / f"{t}.jsonl")}
    sft = {r["question"] for r in read_jsonl(tmp_path / "sft.jsonl")}
    prompts = read_jsonl(tmp_path / "train_prompts.jsonl")
    assert len(bench) == 40 * len(toy.BENCHMARKS)  # distinct within and across benchmarks
    assert not bench & sft
    assert not bench & {r["question"] for r in prompts}
    assert {r["task"] for r in prompts} <= set(toy.IN_DOMAIN)


def test_too_many_distinct_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="arith1"):
        toy.generate("arith1", 5000, seed=0, split="test", max_value=10)


def test_task_yaml_uses_the_checker_regex(repo: Path):
    template = yaml.safe_load((repo / "workflow/tasks/_miniature.yaml").read_text())
    regex = template["filter_list"][0]["filter"][0]["regex_pattern"]
    assert regex == toy.ANSWER_PATTERN
    assert template["doc_to_text"] == toy.PROMPT_TEMPLATE.replace("{question}", "{{question}}")
    for task in toy.BENCHMARKS:
        spec = yaml.safe_load((repo / f"workflow/tasks/{task}.yaml").read_text())
        assert spec["task"] == task
        assert spec["dataset_kwargs"]["data_files"]["test"] == f"data/{task}.jsonl"
