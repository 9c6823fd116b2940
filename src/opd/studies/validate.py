"""Check study configs as the Snakefile does before any job: the schema, then the world's own rules.

    python -m opd.studies.validate config/config.yaml [overlay.yaml ...]

Several files are merged in order (later ones override, as `snakemake --configfile A B` does). A YAML
syntax error names the file and the line (Snakemake's own loader does not: run this first).
`model_problems` checks the config against the models already on disk (K within each tokenizer's vocabulary,
every pair sharing one regular vocabulary); the Snakefile runs it too, and each job checks again when it starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd import worlds
from opd.infra import modeldirs
from opd.infra.config import ConfigError, load_yaml, validate_config
from opd.studies import sweep


def merge(base: dict, overlay: dict) -> dict:
    """Snakemake's --configfile merge: nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load(paths: list[Path]) -> dict:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Validate study config(s) against the schema and the world.")
    parser.add_argument("configfiles", nargs="+", type=Path, help="YAML config(s), merged in order")
    args = parser.parse_args(argv)
    names = " + ".join(map(str, args.configfiles))
    try:
        validate_config(load(args.configfiles), checks=[worlds.config_problems, model_problems])
    except ConfigError as err:
        sys.exit(f"{names}: {err}" if "\n" in str(err) else str(err))
    print(f"{names}: valid")


if __name__ == "__main__":
    main()
