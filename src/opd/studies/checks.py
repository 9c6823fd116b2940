"""The checks of a study config before any job, in one list: the workflow, `opd.studies.validate` and
`opd.studies.plan` run the same ones, so "valid" means the workflow will not refuse the config.

`CHECKS` (after the schema and the cross-key rules of `opd.infra.config`): the world's own rules, the
benchmark names (`opd.studies.benchmarks`), the models already on disk (K within each tokenizer's
vocabulary, each pair sharing one tokenizer, weight files that load). `opd.studies.validate.CHECKS` adds the
memory planner's check (`opd.studies.plan.config_problems`), which the planner itself reports as its table.
Every job checks its own inputs again when it starts.
"""

from __future__ import annotations

from pathlib import Path

from opd import worlds
from opd.engines import teacher_server
from opd.infra import modeldirs
from opd.infra.config import Check, load_yaml, validate_config
from opd.studies import benchmarks, evaluate, reference, shapes, sweep


def merge(base: dict, overlay: dict) -> dict:
    """Snakemake's --configfile merge: nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load(paths: list[Path]) -> dict:
    """Config files merged in order; a YAML syntax error names the file and the line."""
    config: dict = {}
    for path in paths:
        config = merge(config, load_yaml(path))
    return config


def _vocabularies(config: dict) -> dict[str, tuple[int, str]]:
    """Vocabulary size and where it was read, per model: its directory on disk, else (a miniature model) the
    world's tokenizer once trained, else the cap world.vocab_size."""
    results = Path(config["results_dir"])
    out = {}
    for name, model in config["models"].items():
        for where in [results / "models" / name] + ([] if model.get("hub") else [results / "tokenizer"]):
            n = modeldirs.vocab_size(where)
            if n is not None:
                out[name] = (n, str(where))
                break
        else:
            if not model.get("hub"):
                out[name] = (config["world"]["vocab_size"], "world.vocab_size")
    return out


def model_problems(config: dict) -> list[str]:
    """K larger than a model's vocabulary, or a pair whose tokenizers differ, for the models known so far."""
    vocab, results = _vocabularies(config), Path(config["results_dir"])
    problems = []
    for key, ks in (("train.top_k", config["train"]["top_k"]), ("diagnose.top_k", [config["diagnose"]["top_k"]])):
        for i, k in enumerate(ks):
            name = f"{key}[{i}]" if key == "train.top_k" else key
            too_small = [f"{m!r} ({n} tokens, {where})" for m, (n, where) in vocab.items() if k > n]
            if too_small:
                problems.append(f"{name}: {k} is larger than the vocabulary of model {', '.join(too_small)}")
    try:
        pair_list = sweep.pairs(config["models"], config["train"])
    except StopIteration:  # no teacher: the config's own checks say so
        pair_list = []
    for teacher, student in pair_list:
        dirs = [results / "models" / teacher, results / "models" / student]
        diff = modeldirs.regular_difference(*dirs)
        if diff is not None:
            problems.append(f"models: {teacher!r} and {student!r} have different tokenizers ({dirs[0]}, {dirs[1]}): "
                            f"regular token id {diff[0]} is {diff[1]!r} vs {diff[2]!r}; on-policy distillation "
                            f"compares token ids, so a pair must share its regular vocabulary (special tokens and "
                            f"chat templates may differ)")
    return problems


def weight_problems(config: dict) -> list[str]:
    """A truncated or corrupt weight file in a model directory already on disk, named with the model's role."""
    results = Path(config["results_dir"])
    return [f"models.{name} ({model['role']}): {problem}; {modeldirs.REMAKE}"
            for name, model in config["models"].items()
            for problem in modeldirs.weight_problems(results / "models" / name)]


def _pairs(config: dict) -> list[tuple[str, str]]:
    """The (teacher, student) pairs, or none when the config has no teacher (another check names that)."""
    try:
        return sweep.pairs(config["models"], config["train"])
    except StopIteration:
        return []


def served_teacher_problems(config: dict) -> list[str]:
    """`train.teacher_placement: server`: signals a vLLM server cannot score, and a URL for every teacher."""
    return teacher_server.config_problems(config, [t for t, _ in _pairs(config)])


def student_build_problems(config: dict) -> list[str]:
    """`train.student_builds: per_seed` rebuilds a student per seed: only a model this workflow makes can be."""
    if not sweep.per_seed_builds(config["train"]):
        return []
    students = dict.fromkeys(s for _, s in _pairs(config))
    return [f"train.student_builds: per_seed builds every student once per seed, but models.{s} is a hub "
            "model (only a miniature-world student, SFT-trained here, can be rebuilt); use shared"
            for s in students if config["models"].get(s, {}).get("hub")]


def trained_eval_problems(config: dict) -> list[str]:
    """`evaluation.trained: with_training` evaluates in the training process: one process, lm-eval's hf backend."""
    if config["evaluation"]["trained"] != "with_training":
        return []
    why = [f"evaluation.backend is {config['evaluation']['backend']!r} (needs hf)"] * (
        config["evaluation"]["backend"] != "hf")
    why += [f"{t} -> {s} trains on {n} GPUs under torchrun (needs one process)" for t, s in _pairs(config)
            if (n := shapes.pair_gpus(config, t, s)) > 1]
    return [f"evaluation.trained: with_training evaluates in the training job's own process, but {w}; use separate"
            for w in why]


CHECKS: list[Check] = [worlds.config_problems, model_problems, weight_problems, benchmarks.config_problems,
                       evaluate.code_execution_problems, reference.config_problems, served_teacher_problems,
                       student_build_problems, trained_eval_problems]


def validate(config: dict, checks: list[Check] = CHECKS) -> dict:
    """`config` validated (defaults filled in) by the schema, the cross-key rules and `checks`; ConfigError."""
    return validate_config(config, checks=checks)
