"""One validation for every entry point: a flag is checked against the config key it stands for.

Each `python -m opd.*` module keeps a small table `FLAGS = {dest: "section.key"}` (one line per flag) and calls
`validate(args, FLAGS)` right after argparse, before any model loads; with `section="train"`, a flag named as
a key of that config section (`--lr` = `train.lr`) needs no line at all. Every value is validated against that
key's part of config.schema.yaml with the config's own messages (`opd.infra.config`), so `--lr -1` and
`train.lr: -1` are refused alike, naming the flag, the value, what is allowed and the config key. Key syntax:
`train.top_k[]` = one item of the list `train.top_k`; `models.*.lr` = the key of any model. A flag that no
config key stands for (e.g. `--batch-size` of the engines) gives a small schema of its own (a dict) instead.
`validate` then checks that the tracking store answers (`opd.infra.tracking.check_reachable`).

Also: `ArgumentParser`, which reads `--lr -1e-4` as a value (argparse before Python 3.13 takes it for an
option), and `run(main)` for `__main__`, which prints an `InputError` or a `Fault` as one line instead of a
traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Callable

from opd.infra.config import ConfigError, allowed, describe, load_schema
from opd.infra.io import Fault, InputError

# What argparse should read as a number, not an option: -1, -0.5, -.5, -1e-4, -2.5E+3.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
POSITIVE = {"type": "integer", "minimum": 1}  # the schema of a count flag that no config key stands for
NONNEGATIVE = {"type": "integer", "minimum": 0}
# Flags every entry point has, and the config keys they stand for.
COMMON = {"threads": "threads", "study": "study"}


class FlagError(ConfigError):
    """Flags the schema refuses; the message names each flag, its value, the allowed range and the config key."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with negative numbers in scientific notation read as values (`--lr -1e-4`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse's own pattern (Python < 3.13) misses exponents, so `-1e-4` became "expected one argument".
        self._negative_number_matcher = NEGATIVE_NUMBER


def subschema(schema: dict, key: str) -> dict:
    """The part of `schema` that validates config key `key` (`a.b`, `a.b[]` for an item, `*` for any name)."""
    node = schema
    for part in key.split("."):
        item, part = part.endswith("[]"), part.removesuffix("[]")
        node = next(iter(node["patternProperties"].values())) if part == "*" else node["properties"][part]
        if "$ref" in node:  # "#/$defs/name"
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
        if item:
            node = node["items"]
    return node


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def flag_problems(args: argparse.Namespace, flags: dict[str, str | dict], schema: dict | None = None) -> list[str]:
    """One line per flag value that its config key (or own schema) refuses; flags left at None are not given.

    Without jsonschema (benchmarks/gpu_smoke.py on a GPU box with only torch + transformers + safetensors)
    the flags are not checked, with one warning: a pinned install always has it.
    """
    try:
        import jsonschema
    except ImportError:
        import warnings

        warnings.warn("jsonschema is not installed: command-line flags are not checked against the schema")
        return []

    schema = schema or load_schema()
    problems = []
    for dest, key in flags.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        value = str(value) if isinstance(value, Path) else value
        where = f" (config {key.removesuffix('[]')})" if isinstance(key, str) else ""
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{flag_name(dest)}: {value!r} is not a finite number{where}")
            continue
        sub = key if isinstance(key, dict) else subschema(schema, key)
        for error in jsonschema.Draft202012Validator(sub).iter_errors(value):
            problems.append(describe(error, flag_name(dest)) + where)
    return problems


def check_flags(args: argparse.Namespace, flags: dict[str, str | dict]) -> None:
    """FlagError with every refused flag, in one message."""
    problems = flag_problems(args, flags)
    if problems:
        raise FlagError(f"invalid flag{'s' if len(problems) > 1 else ''}: " + "; ".join(problems))


def section_flags(dests, section: str) -> dict[str, str]:
    """dest -> "section.dest" for each flag (of `dests`, or of a Namespace) named as a key of that config section."""
    keys = load_schema()["properties"][section]["properties"]
    return {dest: f"{section}.{dest}" for dest in (vars(dests) if isinstance(dests, argparse.Namespace) else dests)
            if dest in keys}


def flag_table(dests, flags: dict[str, str | dict], section: str | None = None) -> dict[str, str | dict]:
    """The one table of a module's flags: dest -> config key (or own schema); `flags` wins over the keys of
    `section` (e.g. `--top-k` is one item of the list train.top_k). `validate` checks and `document` explains it."""
    return {**COMMON, **(section_flags(dests, section) if section else {}), **flags}


def document(parser: argparse.ArgumentParser, flags: dict[str, str | dict], section: str | None = None) -> None:
    """End each tabled flag's help with what is allowed and its config key, read from the same table and schema
    the flags are checked against, so help and checks cannot disagree (e.g. "(allowed: (0, 10]; config
    train.temperature)")."""
    schema = load_schema()
    table = flag_table([a.dest for a in parser._actions], flags, section)
    for action in parser._actions:
        key = table.get(action.dest)
        if key is None or action.help in (None, argparse.SUPPRESS):
            continue
        rule = allowed(key if isinstance(key, dict) else subschema(schema, key))
        notes = ([f"allowed: {rule}"] if rule else []) + ([f"config {key.removesuffix('[]')}"]
                                                           if isinstance(key, str) else [])
        if notes:
            action.help = f"{action.help} ({'; '.join(notes).replace('%', '%%')})"  # argparse formats help with %


def validate(args: argparse.Namespace, flags: dict[str, str | dict], section: str | None = None) -> argparse.Namespace:
    """The flags against the schema, then the tracking store: both before any model loads; returns `args`."""
    from opd.infra import tracking

    check_flags(args, flag_table(args, flags, section))
    tracking.check_reachable()
    return args


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, flags: dict[str, str | dict],
          section: str | None = None) -> argparse.Namespace:
    """`document` the flags, parse `argv`, then `validate`: the usual end of a module's `parse_args`."""
    document(parser, flags, section)
    return validate(parser.parse_args(argv), flags, section)


def run(main: Callable[[], object], prog: str | None = None) -> None:
    """`main()`, with a bad input (an InputError: a flag, a config key, a data file) or a fault of the machine
    (a Fault: a full disk, a worker that died) told in one line, after `prog` (default: the `python -m` module).

    OPD_TRACEBACK=1 shows the traceback instead.
    """
    if os.environ.get("OPD_TRACEBACK"):
        main()
        return
    try:
        main()
    except (InputError, Fault) as err:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # python -m opd.engines.train
        prog = prog or (spec.name if spec is not None else "opd")
        sys.exit(f"{prog}: error: {err}")


def interpreter_functions(python: str, conda: bool = False) -> str:
    """Bash that makes `python` and `torchrun` in the rest of a rule's shell mean interpreter `python` (the one
    that runs Snakemake; workflow/rules/common.smk), whatever is first on PATH; "" under --sdm conda, where
    the rule's own conda env is activated first and its `python` is the one to use."""
    if conda:
        return ""
    py = shlex.quote(python)
    return f'python() {{ {py} "$@"; }}; torchrun() {{ {py} -m torch.distributed.run "$@"; }}; '
