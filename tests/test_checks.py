"""One list of checks for every entry point (opd.studies.checks): validate, plan and the workflow agree."""

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
import yaml

from opd.infra.io import InputError
from opd.studies import benchmarks, plan, validate

LM_EVAL = metadata.version("lm_eval")
FAKE_REGISTRY = ["gsm8k", "hellaswag", "aime", "mmlu"]  # stands in for lm-eval's 14k task names


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """lm-eval's registry read from its cache file, written here with a few names (building it takes a minute)."""
    cache = tmp_path / "cache"
    (cache / "opd").mkdir(parents=True)
    (cache / "opd" / f"lm_eval_tasks-{LM_EVAL}.txt").write_text("\n".join(FAKE_REGISTRY) + "\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    benchmarks.lm_eval_tasks.cache_clear()
    yield cache
    benchmarks.lm_eval_tasks.cache_clear()


def _overlay(tmp_path, data: dict):
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_benchmark_that_exists_nowhere_is_refused_naming_key_value_and_closest(repo, tmp_path, registry, monkeypatch):
    monkeypatch.chdir(repo)
    paper = yaml.safe_load((repo / "config" / "paper.yaml").read_text())["evaluation"]["benchmarks"]
    overlay = _overlay(tmp_path, {"evaluation": {"benchmarks": [*paper, "aime2", "gsm8k"]}})
    with pytest.raises(SystemExit) as err:
        validate.main([str(repo / "config" / "paper.yaml"), str(overlay)])
    assert str(err.value).endswith(  # (validate runs in the project root, where tasks_dir is relative to)
        f"invalid config:\n  - evaluation.benchmarks[7]: 'aime2' is not a task of workflow/tasks/paper "
        f"(evaluation.tasks_dir) nor of lm-eval {LM_EVAL}'s registry; closest: 'aime25', 'aime24', 'aime'")
    # gsm8k is one of lm-eval's own tasks, the others ours: accepted
    overlay = _overlay(tmp_path, {"evaluation": {"benchmarks": [*paper, "gsm8k"]},  # its size for the cost plan:
                                  "resources": {"cost": {"eval_problems": {"gsm8k": 1319}}}})
    validate.main([str(repo / "config" / "paper.yaml"), str(overlay)])


def test_the_workflow_refuses_an_unknown_benchmark_before_planning_a_job(repo, tmp_path, registry):
    names = yaml.safe_load((repo / "config" / "paper.yaml").read_text())["evaluation"]["benchmarks"]
    overlay = _overlay(tmp_path, {"evaluation": {"benchmarks": [*names, "aime2"]}})
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile",
                          str(repo / "config" / "paper.yaml"), str(overlay), "--directory", str(tmp_path)],
                         cwd=repo, capture_output=True, text=True, env={**os.environ})
    assert out.returncode != 0
    assert (f"invalid config:\n  - evaluation.benchmarks[{len(names)}]: 'aime2' is not a task of "
            f"{repo / 'workflow' / 'tasks' / 'paper'} (evaluation.tasks_dir) nor of lm-eval {LM_EVAL}'s registry; "
            f"closest: 'aime25', 'aime24', 'aime'\n") in out.stdout + out.stderr


@pytest.mark.slow
def test_lm_eval_registry_is_read_without_data_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    benchmarks.lm_eval_tasks.cache_clear()
    try:
        names = benchmarks.lm_eval_tasks()
    finally:
        benchmarks.lm_eval_tasks.cache_clear()
    assert {"gsm8k", "hellaswag", "minerva_math500"} <= names and "gsm8kk" not in names
    cached = (tmp_path / "opd" / f"lm_eval_tasks-{LM_EVAL}.txt").read_text().split()
    assert set(cached) == names


def test_validate_runs_the_memory_planner_as_the_workflow_does(repo, tmp_path):
    overlay = _overlay(tmp_path, {"train": {"pairs": [{"teacher": "qwen3_8b", "student": "qwen3_1p7b", "gpu": 2},
                                                      {"teacher": "qwen3_8b", "student": "qwen3_4b", "gpu": 2}]}})
    with pytest.raises(SystemExit) as err:  # the 4B student on two 80 GB GPUs
        validate.main([str(repo / "config" / "paper.yaml"), str(overlay)])
    assert "  - train qwen3_8b -> qwen3_4b: estimated peak " in str(err.value)
    assert "GiB per GPU > resources.train.gpu_mem_gb 79; fits with train.sharding: fsdp and 4 GPUs" in str(err.value)


def _contradicting_shape(repo, tmp_path):
    """A paper overlay whose qwen3_1p7b config.json on disk says hidden_size 1024 (its shape key says 2048)."""
    config = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    model = tmp_path / "results" / "models" / "qwen3_1p7b"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({**config["models"]["qwen3_1p7b"]["shape"], "hidden_size": 1024}))
    return _overlay(tmp_path, {"results_dir": str(tmp_path / "results")}), model / "config.json"


def test_validate_refuses_a_shape_key_contradicting_config_json(repo, tmp_path):
    overlay, on_disk = _contradicting_shape(repo, tmp_path)
    with pytest.raises(SystemExit) as err:
        validate.main([str(repo / "config" / "paper.yaml"), str(overlay)])
    assert f"  - models.qwen3_1p7b.shape.hidden_size: 2048 contradicts hidden_size=1024 in {on_disk}" \
        in str(err.value)


def test_plan_exits_non_zero_when_a_shape_contradicts_or_a_job_does_not_fit(repo, tmp_path, capsys):
    overlay, on_disk = _contradicting_shape(repo, tmp_path)
    with pytest.raises(InputError) as err:
        plan.main(["--configfile", str(repo / "config" / "paper.yaml"), str(overlay)])
    assert str(err.value) == "1 problem(s), listed above under 'Does not fit'"
    out = capsys.readouterr().out
    assert f"Does not fit:\n- models.qwen3_1p7b.shape.hidden_size: 2048 contradicts hidden_size=1024 in {on_disk}" \
        in out
    shutil.rmtree(tmp_path / "results")
    small = _overlay(tmp_path, {"resources": {"train": {"gpu_mem_gb": 40}}})
    run = subprocess.run([sys.executable, "-m", "opd.studies.plan", "--configfile", str(repo / "config" / "paper.yaml"),
                          str(small)], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 1
    assert "GiB per GPU > resources.train.gpu_mem_gb 40" in run.stdout
    assert run.stderr.strip() == "opd.studies.plan: error: 3 problem(s), listed above under 'Does not fit'"


def test_corrupt_weights_on_disk_are_refused_at_validation_naming_file_and_role(repo, tmp_path, tiny_world):
    models = tmp_path / "results" / "models"
    shutil.copytree(tiny_world["teacher"], models / "teacher")
    weights = models / "teacher" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size - 100)
    overlay = _overlay(tmp_path, {"results_dir": str(tmp_path / "results")})
    with pytest.raises(SystemExit) as err:
        validate.main([str(repo / "config" / "config.yaml"), str(overlay)])
    assert (f"  - models.teacher (teacher): {weights}: truncated or corrupt ({size - 100} bytes, its header "
            f"describes {size}); delete the model directory and rerun the job that made it") in str(err.value)


def test_per_seed_student_builds_of_a_hub_student_are_refused_naming_key_and_model(repo, tmp_path):
    overlay = _overlay(tmp_path, {"train": {"seeds": [0, 1], "student_builds": "per_seed"}})
    with pytest.raises(SystemExit) as err:
        validate.main([str(repo / "config" / "paper.yaml"), str(overlay)])
    assert "train.student_builds: per_seed builds every student once per seed, but models.qwen3_1p7b is a hub" \
        in str(err.value)


def test_evaluation_with_training_is_refused_for_vllm_and_torchrun_naming_the_key(repo, tmp_path):
    overlay = _overlay(tmp_path, {"evaluation": {"trained": "with_training"}})
    with pytest.raises(SystemExit) as err:
        validate.main([str(repo / "config" / "paper.yaml"), str(overlay)])
    lead = "  - evaluation.trained: with_training evaluates in the training job's own process, but "
    assert f"{lead}evaluation.backend is 'vllm' (needs hf); use separate" in str(err.value)
    assert f"{lead}qwen3_8b -> qwen3_4b trains on 4 GPUs under torchrun (needs one process); use separate" \
        in str(err.value)
    validate.main([str(repo / "config" / "config.yaml")])  # the miniature study: hf, one process
