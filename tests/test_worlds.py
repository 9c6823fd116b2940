"""The world interface: the registry, each world's checker, and the world reaching opd.engines.train's metrics."""

import argparse
import copy
from pathlib import Path

import pytest
import torch
import yaml

from opd import worlds
from opd.engines import train
from opd.engines.rollout import Rollouts
from opd.infra.config import ConfigError, load_schema, validate_config



def test_registry_knows_both_worlds_and_names_the_known_ones():
    assert worlds.NAMES == ("miniature", "paper")
    assert worlds.get("paper").name == "paper" and worlds.get("miniature").local_tasks[-1] == "reverse"
    with pytest.raises(worlds.UnknownWorldError, match="unknown world 'toy'; known worlds: miniature, paper"):
        worlds.get("toy")


def test_schema_lists_exactly_the_registered_worlds():
    assert load_schema()["properties"]["world"]["properties"]["name"]["enum"] == list(worlds.NAMES)


def test_unknown_world_in_a_config_names_the_key(repo: Path):
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cfg.setdefault("world", {})["name"] = "toy"
    with pytest.raises(ConfigError, match=r"world\.name: 'toy' is not allowed; allowed values: 'miniature', 'paper'"):
        validate_config(cfg, checks=[worlds.config_problems])
    assert worlds.config_problems({"world": {"name": "toy"}}) == [
        "world.name: unknown world 'toy'; known worlds: miniature, paper"]


@pytest.mark.parametrize("response, answer, expected", [
    ("3 plus 4 is 7. The answer is 7.", "7", True),
    ("The answer is 71.", "7", False),
    ("Answer: 7", "7", False),  # the miniature checker reads only its own sentence
])
def test_miniature_checker(response, answer, expected):
    assert worlds.get("miniature").is_correct(response, answer) is expected


@pytest.mark.parametrize("response, answer, expected", [
    ("so the sum is \\boxed{\\frac{3}{4}}.", "0.75", True),
    ("<think>try 5</think>\nThe final answer is $\\boxed{12}$.", "12", True),
    ("Step 1 ...\nAnswer: $12$", "12", True),  # DAPO's own format
    ("Answer: 12\nAnswer: 13", "12", False),  # the last Answer: line counts
    ("<think>\\boxed{12} and then the budget ran out", "12", False),  # thinking never closed
    ("The answer is 12.", "12", False),  # the miniature format is not a committed answer here
])
def test_paper_checker(response, answer, expected):
    assert worlds.get("paper").is_correct(response, answer) is expected


class ScriptedTokenizer:
    """decode() returns the text scripted for each response's first token id."""

    def __init__(self, texts: dict[int, str]):
        self.texts = texts

    def decode(self, ids, skip_special_tokens=True):
        return self.texts[ids[0]]


@pytest.mark.parametrize("world_name, expected", [("paper", 0.5), ("miniature", 0.25)])
def test_the_world_checks_answers_inside_train_metrics(world_name, expected):
    """Four responses, \\boxed{} / Answer: / wrong / miniature sentence: the paper world credits the first two,
    the miniature world only its own sentence (train_accuracy was ~0 under paper.yaml before worlds)."""
    texts = {1: "\\boxed{42}", 2: "<think>hmm</think>\nAnswer: 42", 3: "\\boxed{41}", 4: "The answer is 42."}
    responses = [[1, 9], [2, 9], [3, 9], [4, 9]]
    offsets = torch.tensor([0, 2, 4, 6, 8])
    rollouts = Rollouts(list("abcd"), {"offsets_B1": offsets, "tokens_N": torch.tensor(sum(responses, [])),
                                       "s_logprob_N": torch.full((8,), -1.0), "prompt_offsets_B1": torch.arange(5),
                                       "prompt_tokens_P": torch.zeros(4, dtype=torch.long)})
    tr = argparse.Namespace(world=worlds.get(world_name), tokenizer=ScriptedTokenizer(texts))
    metrics = train.step_metrics(tr, rollouts, {"t_logprob_N": torch.full((8,), -1.5)}, [{"answer": "42"}] * 4,
                                 torch.ones(8, dtype=torch.bool), [None] * 4)
    assert metrics["train_accuracy"] == expected
    assert metrics["reverse_kl_all"] == pytest.approx(0.5)


def test_prompts_the_checker_cannot_read_stop_before_any_model_loads(tmp_path):
    prompts = tmp_path / "train_prompts.jsonl"
    records = [{"id": "a", "question": "q", "answer": "12"}, {"id": "b", "question": "q", "answer": "\\frac{1"}]
    worlds.check_answers(worlds.get("paper"), records[:1], prompts)
    with pytest.raises(ValueError, match=r"train_prompts.jsonl:2: world 'paper' cannot check answer '\\\\frac\{1'"):
        worlds.check_answers(worlds.get("paper"), copy.deepcopy(records), prompts)
    with pytest.raises(ValueError, match=r":1: world 'miniature' cannot check answer 'x\^2'"):
        worlds.check_answers(worlds.get("miniature"), [{"answer": "x^2"}], prompts)
