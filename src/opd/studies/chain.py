"""Several entry points in one Python process: `python -m opd.studies.chain MODULE ARGS... --then MODULE ARGS...`.

Why: on a CPU a job's imports (torch, transformers, MLflow, lm-eval: about 9 s) can outweigh its work. The
miniature study's training job evaluates its student in the same process (config `evaluation.trained:
with_training`) instead of starting a second job that imports it all again.

Every step's flags are parsed and checked (its `parse_args`) before the first step runs, so a bad flag of the
evaluation stops the job before the training, not after it. Then each step's `main(argv)` runs in turn; a step
that fails stops the chain with its own one-line error, named after its module (opd.infra.cli.run).
"""

from __future__ import annotations

import functools
import importlib
import sys

from opd.infra import cli
from opd.infra.io import InputError

THEN = "--then"
ALLOWED = ("opd.engines.train", "opd.studies.evaluate")  # entry points that have run chained (tests/test_chain.py)


def split(argv: list[str]) -> list[tuple[str, list[str]]]:
    """[MODULE ARGS... --then MODULE ARGS...] as (module, args) steps, in order."""
    groups: list[list[str]] = [[]]
    for word in argv:
        if word == THEN:
            groups.append([])
        else:
            groups[-1].append(word)
    if not all(groups):
        raise InputError(f"{' '.join(argv) or '(nothing)'}: expected MODULE ARGS... [{THEN} MODULE ARGS...], "
                         f"with a module before the first and after every {THEN}")
    for module, *_ in groups:
        if module not in ALLOWED:
            raise InputError(f"{module}: not an entry point that runs chained; allowed: {', '.join(ALLOWED)}")
    return [(module, args) for module, *args in groups]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ["-h"], ["--help"]):
        print(__doc__)
        return
    steps = [(importlib.import_module(m), m, args) for m, args in split(argv)]
    for module, name, args in steps:  # every step's flags before any step's work
        cli.run(functools.partial(module.parse_args, args), prog=name)
    for module, name, args in steps:
        cli.run(functools.partial(module.main, args), prog=name)


if __name__ == "__main__":
    cli.run(main)
