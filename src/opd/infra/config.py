"""Config validation: the JSON schema first, then the cross-references a schema cannot express.

The Snakefile calls `validate_config` at load, so a bad key or value stops the run before any job
starts, with one message that names each offending key and what is allowed there.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from opd.infra.io import InputError

# Package data: found the same way in an editable and in a regular install (workflow/schemas links here).
SCHEMA = resources.files("opd.infra") / "config.schema.yaml"


class ConfigError(InputError):
    """An invalid study config; the message names the key(s) and the allowed values."""


def _key(path) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "".join(parts).lstrip(".") or "<top level>"


def describe(error, name: str | None = None) -> str:
    """One line per schema violation: the key, the bad value, what is allowed.

    `name`: what the validated value is called (e.g. a flag, `opd.infra.cli`) instead of its config key.
    """
    key, value, schema = _key(error.absolute_path), error.instance, error.schema
    if name is not None:
        key = name + (key if error.absolute_path else "")
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        patterns = list(schema.get("patternProperties", {}))
        extra = sorted(k for k in value if k not in allowed and not any(re.search(p, k) for p in patterns))
        where = f"under '{key}'" if error.absolute_path else "at the top level"
        hint = f"allowed keys: {', '.join(allowed)}" if allowed else f"names must match {', '.join(patterns)}"
        return f"unknown key(s) {', '.join(map(repr, extra))} {where}; {hint}"
    if kind == "enum":
        return f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, error.validator_value))}"
    if kind == "type":
        return f"{key}: expected {error.validator_value}, got {value!r} ({type(value).__name__})"
    if kind in BOUNDS:
        return f"{key}: {value!r} is out of range; allowed: {value_range(schema)}"
    return f"{key}: {error.message}"  # required, minItems, uniqueItems, pattern, ...


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def value_range(schema: dict) -> str:
    """A number's allowed interval, as `describe` and the flags' help texts write it: [0, 10], (0, 1], [1, inf]."""
    lo = schema.get("minimum", schema.get("exclusiveMinimum", "-inf"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum", "inf"))
    return f"{'(' if 'exclusiveMinimum' in schema else '['}{lo}, {hi}{')' if 'exclusiveMaximum' in schema else ']'}"


def allowed(schema: dict) -> str | None:
    """What a schema node allows, in words (an enum, a range; a list: what each item allows), or None."""
    if "enum" in schema:
        return "one of " + ", ".join(str(v) for v in schema["enum"] if v is not None)
    if any(k in schema for k in BOUNDS):
        return value_range(schema)
    if isinstance(schema.get("items"), dict):
        return allowed(schema["items"])
    return None


def _fill_defaults(config: Any, schema: dict) -> None:
    """Insert schema defaults for missing keys, recursively (objects only)."""
    if not isinstance(config, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in config and "default" in sub:
            config[name] = copy.deepcopy(sub["default"])
        elif isinstance(config.get(name), dict) and isinstance(sub.get("default"), dict):
            # A partly given block (e.g. resources.train: {gpu: 1}) keeps the defaults of the keys it omits.
            for key, value in sub["default"].items():
                config[name].setdefault(key, copy.deepcopy(value))
        if name in config:
            _fill_defaults(config[name], sub)
    for sub in schema.get("patternProperties", {}).values():
        for value in config.values():
            _fill_defaults(value, sub)


ARCH_KEYS = ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "steps")


def _model_checks(config: dict) -> list[str]:
    """A hub model takes no architecture keys; a miniature model needs all of them."""
    problems = []
    for name, m in config.get("models", {}).items():
        given = [k for k in ARCH_KEYS if k in m]
        if m.get("hub") and given:
            problems.append(f"models.{name}: {', '.join(given)} cannot be set for a hub model ({m['hub']})")
        elif not m.get("hub"):
            missing = [k for k in ARCH_KEYS if k not in m]
            if missing:
                problems.append(f"models.{name}: missing {', '.join(missing)} (or give `hub` to download a model)")
            elif config.get("world", {}).get("name", "miniature") != "miniature":
                problems.append(f"models.{name}: a miniature model (no `hub`) is trained on the miniature world's "
                                f"SFT data and needs world.name 'miniature'")
    return problems


def _pair_checks(config: dict) -> list[str]:
    """Distillation pairs: the one teacher (when no pairs are given) or every named pair, defined and distinct."""
    models, train = config.get("models", {}), config.get("train", {})
    students = [n for n, m in models.items() if m.get("role") == "student"]
    problems = []
    if not train.get("pairs"):
        teachers = [n for n, m in models.items() if m.get("role") == "teacher"]
        if len(teachers) != 1:
            problems.append(f"models: exactly one model needs role 'teacher' when train.pairs is not given, "
                            f"found {len(teachers)} ({teachers})")
        if not students:
            problems.append("models: at least one model needs role 'student'")
    for i, name in enumerate(train.get("students") or []):
        if name not in students:
            problems.append(f"train.students[{i}]: {name!r} is not a student; students: "
                            f"{', '.join(map(repr, students))}")
    for i, pair in enumerate(train.get("pairs") or []):
        for side in ("teacher", "student"):
            if pair[side] not in models:
                problems.append(f"train.pairs[{i}].{side}: unknown model {pair[side]!r}; defined models: "
                                f"{', '.join(map(repr, models))}")
        if pair["teacher"] == pair["student"]:
            problems.append(f"train.pairs[{i}]: teacher and student are both {pair['teacher']!r}")
    return problems


def _cross_checks(config: dict) -> list[str]:
    """Rules that span keys: the distillation pairs, every named model defined, grids that stay distinct."""
    models, train = config.get("models", {}), config.get("train", {})
    problems = _model_checks(config) + _pair_checks(config)
    high, low = train.get("clip_eps_high"), train.get("clip_eps")
    if high is not None and low is not None and high < low:
        problems.append(f"train.clip_eps_high: {high} is below train.clip_eps {low}: the upper clip must not be below "
                        f"the lower one (set it >= {low}, or null for the symmetric clip)")
    for i, name in enumerate(config.get("evaluation", {}).get("models") or []):
        if name not in models:
            problems.append(f"evaluation.models[{i}]: unknown model {name!r}; defined models: "
                            f"{', '.join(map(repr, models))}")
    evaluation = config.get("evaluation", {})
    benchmarks = evaluation.get("benchmarks", [])
    for key in ("ood_benchmarks", "metrics"):
        for name in evaluation.get(key, []):
            if name not in benchmarks:
                problems.append(f"evaluation.{key}: {name!r} is not in evaluation.benchmarks ({benchmarks})")
    # Run directories name the ratio in its shortest form ('0.1'), so two values that print alike would
    # share a directory and overwrite each other's runs.
    shown = [f"{float(r):g}" for r in train.get("ratio", [])]
    if len(set(shown)) != len(shown):
        problems.append(f"train.ratio: values {train['ratio']} are not distinct once written as run paths "
                        f"({shown})")
    return problems


def load_yaml(path: Path | str) -> dict:
    """One YAML config file as a mapping; a syntax error names the file, the line and the column.

    (Snakemake's own loader says only "not valid JSON or YAML": `python -m opd.studies.validate` and the
    Makefile use this one.)
    """
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {err.problem or err.context}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    return data or {}


def load_schema(path: Path | str | None = None) -> dict:
    with (SCHEMA.open() if path is None else open(path)) as fh:
        return yaml.safe_load(fh)


Check = Callable[[dict], list[str]]


def validate_config(config: dict, schema_path: Path | str | None = None, checks: Iterable[Check] = ()) -> dict:
    """Validate `config` in place (defaults filled in) and return it; raise ConfigError if invalid.

    `checks` are further functions of the filled-in config returning problems (e.g. the world's,
    `opd.worlds.config_problems`): layers above this one add their rules without this module importing them.
    """
    import jsonschema

    schema = load_schema(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    problems = [describe(e) for e in errors]
    if not problems:
        _fill_defaults(config, schema)
        problems = _cross_checks(config) + [p for check in checks for p in check(config)]
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return config
