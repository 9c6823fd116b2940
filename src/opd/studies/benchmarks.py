"""Benchmark names checked at validation: each is a task of our task folder or of the pinned lm-eval's registry.

Our folder (`evaluation.tasks_dir`, e.g. workflow/tasks or workflow/tasks/paper) is read first: the `task`
(and `group`) names of its YAML files, a few files, read in milliseconds. Only a name that is not there is
looked up in lm-eval's registry: the names of `lm_eval.tasks.TaskManager`'s index, which reads the task
YAMLs shipped with lm-eval without loading a data set or touching the network. Building that index reads
~14k files (15 s on an idle 2-core machine, a minute on a busy one), so the names are cached once per lm-eval
version under $XDG_CACHE_HOME/opd (default ~/.cache/opd); a study whose benchmarks are all ours (both
shipped configs) never builds it. `evaluation.ood_benchmarks` and `evaluation.metrics` must name benchmarks
of the study (opd.infra.config), so they are checked through `evaluation.benchmarks`. A world with a closed
list of benchmarks (the miniature world) refuses other names itself.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from importlib import metadata
from pathlib import Path

import yaml

from opd import worlds
from opd.infra.io import write_text

REPO = Path(__file__).resolve().parents[3]  # the source tree: workflow/ beside src/


class _Loader(yaml.SafeLoader):
    """lm-eval task YAMLs carry `!function module.name` tags: read them as nothing (only names matter)."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def project_path(name: str | Path) -> Path:
    """A path named in a config as the workflow reads it: relative to the working directory (the project root,
    where Snakemake runs) when it exists there, else to the source tree's root."""
    given = Path(name)
    if given.is_absolute() or given.exists():
        return given
    return REPO / given


def tasks_dir(config: dict) -> Path:
    """`evaluation.tasks_dir` as the workflow reads it (`project_path`)."""
    return project_path(config["evaluation"]["tasks_dir"])


def our_tasks(folder: Path) -> set[str]:
    """The `task` and `group` names of a task folder's YAML files (not of its subfolders)."""
    names: set[str] = set()
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        spec = yaml.load(path.read_text(), Loader=_Loader) or {}
        for key in ("task", "group"):
            if isinstance(spec, dict) and isinstance(spec.get(key), str):
                names.add(spec[key])
    return names


def _cache_file(version: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "opd" / f"lm_eval_tasks-{version}.txt"


@functools.lru_cache(maxsize=1)
def lm_eval_tasks() -> frozenset[str]:
    """Every task, group and tag name of the installed lm-eval's registry (cached per lm-eval version)."""
    version = metadata.version("lm_eval")
    cache = _cache_file(version)
    if cache.is_file():
        return frozenset(cache.read_text().split())
    print(f"opd: indexing lm-eval {version}'s task names once (cached in {cache})", file=sys.stderr)
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager().all_tasks)
    write_text(cache, "\n".join(names) + "\n")
    return frozenset(names)


def config_problems(config: dict) -> list[str]:
    """Validation check (opd.studies.checks): each evaluation.benchmarks name known, or the closest names.

    A world with a closed list of benchmarks (the miniature world) checks them itself (`opd.worlds`)."""
    try:
        if worlds.get(config["world"]["name"]).closed_benchmarks:
            return []
    except worlds.UnknownWorldError:  # the world's own check says so
        return []
    folder = tasks_dir(config)
    ours = our_tasks(folder)
    problems = []
    for i, name in enumerate(config["evaluation"]["benchmarks"]):
        if name in ours or name in lm_eval_tasks():
            continue
        close = difflib.get_close_matches(name, sorted(ours | lm_eval_tasks()), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(map(repr, close))}" if close else ""
        problems.append(f"evaluation.benchmarks[{i}]: {name!r} is not a task of {folder} (evaluation.tasks_dir) "
                        f"nor of lm-eval {metadata.version('lm_eval')}'s registry{hint}")
    return problems
