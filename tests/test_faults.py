"""Bad models and files: each refused in one message naming the flag, key, file or line, before any job runs."""

import shutil
import time
from pathlib import Path

import pytest

from opd.engines import rollout, train
from opd.infra import modeldirs
from opd.infra.config import ConfigError, validate_config
from opd.infra.io import DataFileError
from opd.studies import evaluate, validate

from test_train import argv


@pytest.fixture
def no_weights(monkeypatch):
    """Loading model weights fails the test: the checks must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("model weights loaded before the check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_k_larger_than_the_vocabulary_is_refused_before_weights_load(tiny_world, tmp_path, no_weights):
    n = len(tiny_world["tokenizer"])
    with pytest.raises(modeldirs.ModelDirError) as err:
        train.main(argv(tiny_world, tmp_path / "out", "--method", "full", "--top-k", "1000"))
    assert str(err.value) == f"--top-k 1000: larger than the vocabulary of {tiny_world['student']} ({n} tokens)"
    with pytest.raises(modeldirs.ModelDirError, match=f"--top-k 1000: larger than the vocabulary .*{n} tokens"):
        rollout.main(["--model-dir", str(tiny_world["student"]), "--prompts", str(tiny_world["prompts"]),
                      "--out", str(tmp_path / "r.safetensors"), "--world", "miniature", "--top-k", "1000"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.safetensors").exists()


@pytest.mark.parametrize("path", ["missing_dir", "models/student_s"])  # the second looks like a hub id
def test_missing_model_directory_is_named_and_never_looked_up_on_the_hub(tiny_world, tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    args = argv(tiny_world, tmp_path / "out", "--method", "full")
    args[args.index("--student") + 1] = path
    start = time.monotonic()
    with pytest.raises(modeldirs.ModelDirError) as err:
        train.main(args)
    assert time.monotonic() - start < 10  # the hub's retries took 49 s
    assert str(err.value).startswith(f"--student {path}: no model directory there (does not exist;")


def _study(tmp_path: Path, **train) -> dict:
    return {"results_dir": str(tmp_path / "results"), "world": {"vocab_size": 400},
            "models": {"teacher": {"role": "teacher", "hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1,
                                   "intermediate_size": 64, "steps": 1},
                       "student": {"role": "student", "hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1,
                                   "intermediate_size": 32, "steps": 1}},
            "train": train}


def test_config_k_is_checked_against_the_models_on_disk(tiny_world, tmp_path):
    with pytest.raises(ConfigError) as err:  # nothing built yet: the tokenizer's cap, world.vocab_size
        validate_config(_study(tmp_path, top_k=[16, 1000]), checks=[validate.model_problems])
    assert "train.top_k[1]: 1000 is larger than the vocabulary of model 'teacher' (400 tokens, world.vocab_size)" \
        in str(err.value)
    for name in ("teacher", "student"):
        shutil.copytree(tiny_world[name], tmp_path / "results" / "models" / name)
    n = len(tiny_world["tokenizer"])
    assert n < 399
    with pytest.raises(ConfigError) as err:  # the models are there: their real vocabulary
        validate_config(_study(tmp_path, top_k=[399]), checks=[validate.model_problems])
    assert (f"train.top_k[0]: 399 is larger than the vocabulary of model 'teacher' ({n} tokens, "
            f"{tmp_path / 'results' / 'models' / 'teacher'})") in str(err.value)
    validate_config(_study(tmp_path, top_k=[n]), checks=[validate.model_problems])


def test_config_pair_with_two_tokenizers_is_refused(tiny_world, tmp_path):
    models = tmp_path / "results" / "models"
    for name in ("teacher", "student"):
        shutil.copytree(tiny_world[name], models / name)
    tok = tiny_world["tokenizer"].__class__.from_pretrained(str(models / "teacher"))
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tok.save_pretrained(str(models / "teacher"))
    validate_config(_study(tmp_path), checks=[validate.model_problems])  # an added token: a pair across templates
    from opd.worlds.miniature import generator as toy
    from opd.worlds.miniature.tokenizer import train_tokenizer

    other = train_tokenizer([p + t for p, t in toy.iter_problems(toy.generate("reverse", 40, 1, "x"))], 300)
    other.save_pretrained(str(models / "teacher"))
    with pytest.raises(ConfigError, match="models: 'teacher' and 'student' have different tokenizers .*: regular "
                                          "token id \\d+ is "):
        validate_config(_study(tmp_path), checks=[validate.model_problems])


def test_yaml_overlay_syntax_error_names_file_and_line(tmp_path, repo):
    bad = tmp_path / "overlay.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: [1e-4\nseed: 1\n")
    with pytest.raises(SystemExit) as err:
        validate.main([str(repo / "config" / "config.yaml"), str(bad)])
    assert str(err.value).startswith(f"{bad}:4:5: YAML syntax error: ")


def _task(tmp_path: Path, lines: list[str]) -> Path:
    tasks, data = tmp_path / "tasks", tmp_path / "bench.jsonl"
    tasks.mkdir()
    (tasks / "mytask.yaml").write_text(f"task: mytask\ndataset_path: json\nprocess_docs: !function utils.f\n"
                                       f"dataset_kwargs:\n  data_files:\n    test: {data}\n")
    data.write_text("".join(line + "\n" for line in lines))
    return tasks


def test_malformed_benchmark_line_is_one_error_before_lm_eval(tiny_world, tmp_path, monkeypatch):
    tasks = _task(tmp_path, ['{"question": "1+1", "answer": "2"}', '{"question": "2+2", "answer": '])
    monkeypatch.setattr(evaluate, "run_lm_eval", lambda *a, **k: pytest.fail("lm-eval started"))
    with pytest.raises(DataFileError) as err:
        evaluate.main(["--model-dir", str(tiny_world["student"]), "--model-name", "s", "--tasks", "mytask",
                       "--include-path", str(tasks), "--out-dir", str(tmp_path / "out")])
    assert str(err.value).startswith(f"{tmp_path / 'bench.jsonl'}:2: not valid JSON")
    assert evaluate.task_data_files(tasks / "mytask.yaml") == [tmp_path / "bench.jsonl"]
