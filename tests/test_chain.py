"""opd.studies.chain: several entry points in one process, every step's flags checked before any step runs."""

import pytest

from opd.engines import train
from opd.studies import chain
from opd.infra.io import InputError
from opd.studies import evaluate

TRAIN = ["--student", "s", "--teacher", "t", "--prompts", "p.jsonl", "--out-dir", "o", "--method", "full",
         "--world", "miniature"]
EVALUATE = ["--model-dir", "m", "--model-name", "m", "--tasks", "arith1", "--include-path", "t", "--out-dir", "o"]


def test_split_into_steps_in_order():
    argv = ["opd.engines.train", "--student", "s", "--then", "opd.studies.evaluate", "--tasks", "a", "b"]
    assert chain.split(argv) == [("opd.engines.train", ["--student", "s"]),
                                 ("opd.studies.evaluate", ["--tasks", "a", "b"])]
    assert chain.split(["opd.studies.evaluate"]) == [("opd.studies.evaluate", [])]


def test_help_is_the_module_doc(capsys):
    chain.main(["--help"])
    assert capsys.readouterr().out.startswith("Several entry points in one Python process")


@pytest.mark.parametrize("argv", [[], ["opd.engines.train", "--then"], ["--then", "opd.studies.evaluate"],
                                  ["opd.engines.train", "--then", "--then", "opd.studies.evaluate"]])
def test_a_missing_module_is_one_error(argv):
    with pytest.raises(InputError, match="expected MODULE ARGS... \\[--then MODULE ARGS...\\]"):
        chain.split(argv)


def test_only_known_entry_points_run_chained():
    with pytest.raises(InputError, match="^os: not an entry point that runs chained; allowed: opd.engines.train, "
                                         "opd.studies.evaluate$"):
        chain.split(["opd.engines.train", "--then", "os", "-c", "x"])


def test_a_bad_evaluation_flag_stops_the_chain_before_training(monkeypatch, capsys):
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("training started"))
    argv = ["opd.engines.train", *TRAIN, "--then", "opd.studies.evaluate", *EVALUATE, "--max-gen-toks", "4"]
    with pytest.raises(SystemExit) as stop:
        chain.main(argv)
    assert str(stop.value) == ("opd.studies.evaluate: error: invalid flag: --max-gen-toks: 4 is out of range; "
                               "allowed: [8, 32768] (config evaluation.max_gen_toks)")


def test_steps_run_in_order_with_their_own_flags(monkeypatch):
    ran = []
    monkeypatch.setattr(train, "parse_args", lambda argv: ran.append(("parse train", argv)))
    monkeypatch.setattr(evaluate, "parse_args", lambda argv: ran.append(("parse evaluate", argv)))
    monkeypatch.setattr(train, "main", lambda argv: ran.append(("train", argv)))
    monkeypatch.setattr(evaluate, "main", lambda argv: ran.append(("evaluate", argv)))
    chain.main(["opd.engines.train", "-a", "--then", "opd.studies.evaluate", "-b"])
    assert ran == [("parse train", ["-a"]), ("parse evaluate", ["-b"]), ("train", ["-a"]), ("evaluate", ["-b"])]


def test_a_failing_step_stops_the_chain_naming_its_module(monkeypatch):
    monkeypatch.setattr(train, "parse_args", lambda argv: None)
    monkeypatch.setattr(evaluate, "parse_args", lambda argv: None)
    monkeypatch.setattr(train, "main", lambda argv: (_ for _ in ()).throw(InputError("--student s: no model")))
    monkeypatch.setattr(evaluate, "main", lambda argv: pytest.fail("evaluated after a failed training"))
    with pytest.raises(SystemExit) as stop:
        chain.main(["opd.engines.train", "--then", "opd.studies.evaluate"])
    assert str(stop.value) == "opd.engines.train: error: --student s: no model"
