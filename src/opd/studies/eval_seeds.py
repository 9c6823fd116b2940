"""Evaluation seeds: one checkpoint evaluated several times with its sampling seeded differently.

Each (model, benchmark, evaluation seed) is its own lm-eval job and files (seed 0 in the evaluation
directory itself, seed s in <dir>/evalseed~<s>/: opd.infra.lmeval_results.eval_seed_dir). Two things are
read from them:
- a problem's score for the statistics: its mean over the evaluation seeds (opd.studies.stats takes it as
  it takes a problem's 0/1 today; docs/statistics.md says what the seeds add);
- the spread TA-OPD prints: per evaluation seed the column's score (training seeds averaged, then the
  column's tasks averaged), and their mean ± std (sample standard deviation, n - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opd.infra.lmeval_results import eval_seed_dir, read_samples


@dataclass(frozen=True)
class Spread:
    """Mean ± std of a score over evaluation seeds (fractions); std is nan with one seed."""
    mean: float
    std: float
    n: int


# {row name: {task: {evaluation seed: [accuracy of each training seed]}}}
SeedScores = dict[str, dict[str, dict[int, list[float]]]]


def read_problem_means(eval_dir: Path, task: str, metric: str, eval_seeds: list[int]) -> tuple[dict, dict]:
    """({problem: mean over evaluation seeds}, {evaluation seed: accuracy}) of one evaluation directory.

    Every seed must have scored the same problems: a mean over seeds that saw different problems would
    mix problems, so the error names both files.
    """
    eval_dir = Path(eval_dir)
    per_seed = {s: read_samples(eval_seed_dir(eval_dir, s) / f"{task}.samples.jsonl", task, metric)
                for s in eval_seeds}
    first = eval_seeds[0]
    for s in eval_seeds[1:]:
        if per_seed[s].keys() != per_seed[first].keys():
            raise ValueError(f"{eval_seed_dir(eval_dir, s) / f'{task}.samples.jsonl'} and "
                             f"{eval_seed_dir(eval_dir, first) / f'{task}.samples.jsonl'}: evaluation seeds "
                             f"{first} and {s} scored different problems ({len(per_seed[first])} vs "
                             f"{len(per_seed[s])}, {len(per_seed[first].keys() & per_seed[s].keys())} shared)")
    means = {k: sum(per_seed[s][k] for s in eval_seeds) / len(eval_seeds) for k in per_seed[first]}
    accuracy = {s: sum(v.values()) / len(v) for s, v in per_seed.items()}
    return means, accuracy


def add(seed_scores: SeedScores, name: str, task: str, accuracy: dict[int, float]) -> None:
    """Record one training seed's per-evaluation-seed accuracies of `task` under row `name`."""
    cells = seed_scores.setdefault(name, {}).setdefault(task, {})
    for s, acc in accuracy.items():
        cells.setdefault(s, []).append(acc)


def spread(seed_scores: SeedScores, name: str, tasks: list[str]) -> Spread:
    """Mean ± std over evaluation seeds of row `name` on the column made of `tasks` (plain mean of tasks)."""
    rows = seed_scores[name]
    seeds = list(rows[tasks[0]])
    per_seed = [float(np.mean([np.mean(rows[t][s]) for t in tasks])) for s in seeds]
    std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan
    return Spread(float(np.mean(per_seed)), std, len(per_seed))


def spreads(seed_scores: SeedScores, columns: dict[str, list[str]]) -> dict[str, dict[str, Spread]]:
    """{row: {column: Spread}} for every row of `seed_scores`."""
    return {name: {col: spread(seed_scores, name, tasks) for col, tasks in columns.items()} for name in seed_scores}


def text(s: Spread | None) -> str:
    """'42.4 ± 1.3' (points), as the paper prints it; '' for one evaluation seed."""
    if s is None or s.n < 2:
        return ""
    return f"{100 * s.mean:.1f} ± {100 * s.std:.1f}"


def mlflow_metrics(prefix: str, seed_scores: SeedScores) -> dict[str, float]:
    """{prefix.row.task.eval_seed_<s>: %} for every evaluation seed, and {prefix.row.task.eval_seed_mean: %}."""
    out = {}
    for name, tasks in seed_scores.items():
        for task, cells in tasks.items():
            if len(cells) < 2:  # one evaluation seed: its score is the evaluation's own (logged by its job)
                continue
            out.update({f"{prefix}{name}.{task}.eval_seed_{s}": 100 * float(np.mean(v)) for s, v in cells.items()})
            out[f"{prefix}{name}.{task}.eval_seed_mean"] = 100 * float(np.mean([np.mean(v) for v in cells.values()]))
    return out
