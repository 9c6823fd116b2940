"""The miniature world's own config checks (opd.worlds.miniature.checks) and its SFT coverage filter."""

import pytest
import yaml

from opd import worlds
from opd.infra.config import ConfigError, validate_config
from opd.worlds.miniature.checks import n_params
from opd.worlds.miniature.sft import build_model, within_coverage


@pytest.fixture
def cfg(repo):
    return yaml.safe_load((repo / "config/config.yaml").read_text())


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, checks=[worlds.config_problems])
    return str(info.value)


def test_parameter_count_by_hand_matches_the_built_model():
    shape = {"hidden_size": 8, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 16}
    # embeddings 10 x 8 = 80; q 8x8, k 8x4, v 8x4, o 8x8 = 192; q/k norms 4 + 4; MLP 3 x 8 x 16 = 384;
    # two RMS norms per layer 16; the final norm 8: 80 + 192 + 8 + 384 + 16 + 8 = 688
    assert n_params(shape, vocab_size=10) == 688
    model = build_model(10, 8, 1, 2, 1, 16, eos_id=0, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 688
    with_head_dim = {**shape, "head_dim": 32, "layers": 2}
    model = build_model(10, 8, 2, 2, 1, 16, eos_id=0, seed=0, head_dim=32)
    assert n_params(with_head_dim, vocab_size=10) == sum(p.numel() for p in model.parameters())


def test_student_larger_than_the_teacher_stops_at_validation(cfg):
    cfg["models"]["student_m"].update(hidden_size=128, layers=4, intermediate_size=512)  # wider MLP than the teacher
    message = _error(cfg)
    assert "models.student_m:" in message and "smaller than its teacher" in message
    assert "student_s" not in message and "student_l" not in message


def test_chain_length_the_generator_cannot_produce_stops_at_validation(cfg):
    cfg["models"]["student_s"]["max_chain"] = 6
    message = _error(cfg)
    assert "models.student_s.max_chain: 6 operations" in message and "longest chain is 5 (arith5)" in message
    cfg["models"]["student_s"]["max_chain"] = 0
    assert "models.student_s.max_chain" in _error(cfg)  # the schema's minimum 1


def test_task_list_without_an_out_of_domain_task_stops_at_validation(cfg):
    cfg["evaluation"]["benchmarks"] = ["arith1", "arith2", "arith3"]
    assert "evaluation.benchmarks: no out-of-domain task (reverse)" in _error(cfg)


def test_sft_coverage_keeps_short_chains_and_every_out_of_domain_record():
    records = [{"task": t} for t in ("arith1", "arith3", "reverse", "arith2", "arith5")]
    assert [r["task"] for r in within_coverage(records, 2)] == ["arith1", "reverse", "arith2"]
    assert within_coverage(records, None) == records
    assert [r["task"] for r in within_coverage(records, 5)] == [r["task"] for r in records]


class _Draws:
    """A stand-in for random.Random whose random() returns the given draws in turn."""

    def __init__(self, draws):
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)


def test_sloppy_steps_are_off_by_one_and_the_chain_goes_on_from_the_written_value():
    from opd.worlds.miniature.generator import sloppy

    rec = {"task": "arith2", "question": "Start with 7. Add 5. Multiply by 2. What is the result?",
           "solution": "7 plus 5 is 12. 12 times 2 is 24. The answer is 24. I checked every step.", "answer": "24"}
    # draw 0.9 >= 0.5: step one is right (12); draw 0.1 < 0.5: step two is written 12 x 2 + 1 = 25
    out = sloppy(rec, _Draws([0.9, 0.1]), noise=0.5, max_value=30)
    assert out["solution"] == "7 plus 5 is 12. 12 times 2 is 25. The answer is 25. I checked every step."
    assert out["answer"] == "25" and rec["answer"] == "24"
    # step one sloppy (12 -> 13), step two right from the written 13: 26
    out = sloppy(rec, _Draws([0.1, 0.9]), noise=0.5, max_value=30)
    assert out["solution"].startswith("7 plus 5 is 13. 13 times 2 is 26. The answer is 26.")
    # at max_value the slip goes down: 18 + 2 = 20 is written 19
    top = {"task": "arith1", "question": "Start with 18. Add 2. What is the result?",
           "solution": "18 plus 2 is 20. The answer is 20.", "answer": "20"}
    assert sloppy(top, _Draws([0.0]), noise=0.6, max_value=20)["solution"] == "18 plus 2 is 19. The answer is 19."
    rev = {"task": "reverse", "question": "Reverse the digits 1 2.", "solution": "x", "answer": "21"}
    assert sloppy(rev, _Draws([]), noise=0.9) is rev  # the out-of-domain task is never sloppy
