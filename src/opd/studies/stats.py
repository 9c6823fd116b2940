"""Uncertainty for the report tables: intervals over problems and seeds, paired comparisons, Holm.

Pure numpy, no I/O, imports nothing of ours. The input is rows (method, seed, task, problem, correct); a
score is the mean over seeds of the unweighted mean over a column's tasks of each task's accuracy.

Intervals: a two-way ("pigeonhole") bootstrap. Each replicate resamples the seeds with replacement and,
independently, each task's problems with replacement; the same problem draw is used for every seed,
because every seed was evaluated on the same problems (problems and seeds are crossed, not nested).
Resampling problems separately per seed would treat them as new problems each time and shrink the
problem part of the variance by the number of seeds. Percentile intervals; p-values from the bootstrap
standard error (normal approximation). Why this design: docs/statistics.md.

Comparisons of two methods are paired on problems (one problem draw shared by both, so the problems'
common difficulty cancels) and unpaired on seeds (each method's seeds are separate training runs) unless
the caller says the seeds are paired: seed s of every method started from the same student build s
(config `train.student_builds: per_seed`), so one seed draw is shared by both and a build's common
distillability cancels as a problem's difficulty does.
Methods evaluated on different problems cannot be paired: the comparison says so and resamples them
independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

LEVEL = 0.95  # interval coverage, and 1 - the verdicts' significance level
N_BOOT = 2000
SEED = 0  # every estimate draws from its own generator seeded with this: results do not depend on call order


@dataclass
class Scores:
    """One method's per-problem results: per task, one {problem: correct} dict per seed (in `seeds` order)."""
    method: str
    seeds: list = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # a readable name per seed, for messages
    tasks: dict[str, list[dict]] = field(default_factory=dict)


@dataclass(frozen=True)
class Estimate:
    mean: float
    lo: float
    hi: float
    n_seeds: int
    n_problems: int


@dataclass(frozen=True)
class Comparison:
    """a − b on one column: difference, its interval, two-sided p-value; `note` says why it is unpaired."""
    a: str
    b: str
    column: str
    diff: float
    lo: float
    hi: float
    p: float
    paired: bool
    note: str = ""
    p_holm: float = math.nan
    verdict: str = ""


def group(rows, runs: dict | None = None) -> dict[str, Scores]:
    """{method: Scores} from (method, seed, task, problem, correct) rows; `runs` names (method, seed) for messages."""
    out: dict[str, Scores] = {}
    for method, seed, task, problem, correct in rows:
        s = out.setdefault(method, Scores(method))
        if seed not in s.seeds:
            s.seeds.append(seed)
            s.runs.append((runs or {}).get((method, seed), f"{method} seed {seed}"))
        cells = s.tasks.setdefault(task, [])
        i = s.seeds.index(seed)
        cells.extend({} for _ in range(i + 1 - len(cells)))
        if problem in cells[i]:
            raise ValueError(f"{s.runs[i]}: problem {problem!r} of task {task!r} appears twice")
        cells[i][problem] = float(correct)
    for s in out.values():
        for task, cells in s.tasks.items():
            if len(cells) != len(s.seeds) or not all(cells):
                missing = [s.runs[i] for i in range(len(s.seeds)) if i >= len(cells) or not cells[i]]
                raise ValueError(f"task {task!r} has no results for {', '.join(missing)}")
    return out


def _common_keys(cells: list[dict]) -> list | None:
    """The problems every seed saw (sorted), or None when the seeds saw different problem sets."""
    keys = sorted(cells[0], key=repr)
    return keys if all(c.keys() == cells[0].keys() for c in cells) else None


def _draw(rng, n: int, n_boot: int) -> np.ndarray:
    """(n_boot, n) resampling weights: multinomial counts / n, so `w @ x` is a resampled mean."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n


def _seed_task_means(s: Scores, task: str, rng, n_boot: int, w_task=None) -> tuple[np.ndarray, np.ndarray]:
    """(each seed's accuracy on `task`, (n_boot, seeds) resampled ones); `w_task` is a shared problem draw."""
    cells = s.tasks[task]
    keys = _common_keys(cells)
    if keys is not None:  # crossed: one problem draw for every seed
        c_SP = np.array([[c[k] for k in keys] for c in cells])
        w = _draw(rng, len(keys), n_boot) if w_task is None else w_task
        return c_SP.mean(1), w @ c_SP.T
    # The seeds saw different problems: nothing is shared, so draw each seed's problems separately.
    vals = [np.array([c[k] for k in sorted(c, key=repr)]) for c in cells]
    return np.array([v.mean() for v in vals]), np.stack([_draw(rng, len(v), n_boot) @ v for v in vals], 1)


def _replicates(s: Scores, tasks: list[str], rng, n_boot: int, shared: dict | None = None, seed_w=None):
    """(point estimate, n_boot bootstrap replicates) of `s` on the column made of `tasks`; `seed_w` is a
    shared (n_boot, seeds) seed draw."""
    point, boot_BS = np.zeros(len(s.seeds)), np.zeros((n_boot, len(s.seeds)))
    for task in tasks:
        p, b = _seed_task_means(s, task, rng, n_boot, (shared or {}).get(task))
        point, boot_BS = point + p / len(tasks), boot_BS + b / len(tasks)
    seed_w = _draw(rng, len(s.seeds), n_boot) if seed_w is None else seed_w
    return float(point.mean()), (seed_w * boot_BS).sum(1)


def _n_problems(s: Scores, tasks: list[str]) -> int:
    return sum(len(s.tasks[t][0]) for t in tasks)


def _percentiles(boot: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def estimate(s: Scores, tasks: list[str], level: float = LEVEL, n_boot: int = N_BOOT,
             seed: int = SEED) -> Estimate:
    """Mean and `level` interval of `s` on the column made of `tasks` (accuracy as a fraction)."""
    _check_tasks(s, tasks)
    mean, boot = _replicates(s, tasks, np.random.default_rng(seed), n_boot)
    lo, hi = _percentiles(boot, level)
    n = _n_problems(s, tasks)
    if hi - lo < 1e-9 and min(mean, 1 - mean) < 1e-9:
        # Every problem had the same outcome, so every replicate does: the bootstrap cannot see the
        # sampling noise. Clopper-Pearson on the problems instead (seeds counted once: conservative).
        edge = 1 - ((1 - level) / 2) ** (1 / n)
        lo, hi = (0.0, edge) if mean < 0.5 else (1 - edge, 1.0)
    return Estimate(mean, lo, hi, len(s.seeds), n)


def _check_tasks(s: Scores, tasks: list[str]) -> None:
    missing = [t for t in tasks if t not in s.tasks]
    if missing:
        raise KeyError(f"{s.method}: no results for task(s) {', '.join(missing)}")


def pairing_problem(a: Scores, b: Scores, tasks: list[str]) -> str:
    """Why `a` and `b` cannot be paired on `tasks` ('' when they can)."""
    for task in tasks:
        for s in (a, b):
            if _common_keys(s.tasks[task]) is None:
                return f"{task}: the seeds of {s.method} ({', '.join(s.runs)}) were evaluated on different problems"
        if a.tasks[task][0].keys() != b.tasks[task][0].keys():
            return (f"{task}: {a.runs[0]} and {b.runs[0]} were evaluated on different problems "
                    f"({len(a.tasks[task][0])} vs {len(b.tasks[task][0])}, "
                    f"{len(a.tasks[task][0].keys() & b.tasks[task][0].keys())} shared)")
    return ""


def compare(a: Scores, b: Scores, tasks: list[str], column: str = "", level: float = LEVEL,
            n_boot: int = N_BOOT, seed: int = SEED, seeds_paired: bool = False) -> Comparison:
    """a − b on the column made of `tasks`: paired on problems where both saw the same ones, and on seeds
    when `seeds_paired` (seed s of both started from the same student build) and both have the same seeds."""
    _check_tasks(a, tasks), _check_tasks(b, tasks)
    rng = np.random.default_rng(seed)
    note = pairing_problem(a, b, tasks)
    if seeds_paired and a.seeds != b.seeds:
        raise ValueError(f"{a.method} (seeds {a.seeds}) and {b.method} (seeds {b.seeds}) cannot be paired on "
                         "seeds: every row of a per-seed-build study needs the same seeds")
    shared = None if note else {t: _draw(rng, len(a.tasks[t][0]), n_boot) for t in tasks}
    seed_w = _draw(rng, len(a.seeds), n_boot) if seeds_paired else None
    mean_a, boot_a = _replicates(a, tasks, rng, n_boot, shared, seed_w)
    mean_b, boot_b = _replicates(b, tasks, rng, n_boot, shared, seed_w)
    diff, boot = mean_a - mean_b, boot_a - boot_b
    lo, hi = _percentiles(boot, level)
    return Comparison(a.method, b.method, column, diff, lo, hi, p_value(diff, boot), not note,
                      f"not paired: {note}" if note else "")


def p_value(diff: float, boot: np.ndarray) -> float:
    """Two-sided p of `diff` = 0 from its bootstrap standard error (normal approximation).

    Counting replicates beyond the null would resolve p only down to 1/(n_boot + 1), which Holm then
    multiplies by the number of comparisons: with a 100-cell sweep nothing could ever pass.
    """
    se = float(np.std(boot, ddof=1))
    if se < 1e-12:  # no replicate varies: the difference is exactly what every resample gives
        return 1.0 if abs(diff) < 1e-12 else 0.0
    return 2 * (1 - NormalDist().cdf(abs(diff) / se))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): family-wise error at most alpha."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(c: Comparison, p_adjusted: float, level: float = LEVEL) -> str:
    """'better' / 'worse' (a vs b) when the adjusted p-value is below 1 − level, else 'n.d.'."""
    if p_adjusted >= 1 - level:
        return "n.d."
    return "better" if c.diff > 0 else "worse"


def compare_all(scores: dict[str, Scores], columns: dict[str, list[str]], pairs: list[tuple[str, str]],
                level: float = LEVEL, n_boot: int = N_BOOT, seed: int = SEED,
                seeds_paired: bool = False) -> list[Comparison]:
    """Every (a, b) of `pairs` on every column, with Holm-adjusted p-values and verdicts over that family."""
    comps = [compare(scores[a], scores[b], tasks, col, level, n_boot, seed, seeds_paired)
             for a, b in pairs for col, tasks in columns.items()]
    adjusted = holm([c.p for c in comps])
    return [Comparison(**{**c.__dict__, "p_holm": p, "verdict": verdict(c, p, level)})
            for c, p in zip(comps, adjusted)]


def noise(scores: dict[str, Scores], tasks: list[str], seeds_paired: bool = False) -> tuple[float, float]:
    """(seed sd, per-problem sd of a paired one-seed difference), fractions.

    The seed sd pools the methods with several seeds (sample variance of their per-seed scores on `tasks`);
    with `seeds_paired` (seed s of every method from student build s) it is the sd over seeds of a *difference*
    of two methods, pooled over the pairs with the same seeds, since the build's share cancels. The problem sd
    pools the one-seed differences of every pair of methods on their common problems (first seed of each).
    nan where the data has no such method or pair.
    """
    diffs = []
    per_seed = {n: np.mean([[np.mean(list(c.values())) for c in s.tasks[t]] for t in tasks], 0)
                for n, s in scores.items() if len(s.seeds) > 1}
    if seeds_paired:
        names = list(per_seed)
        seed_vars = [np.var(per_seed[a] - per_seed[b], ddof=1) for i, a in enumerate(names) for b in names[i + 1:]
                     if scores[a].seeds == scores[b].seeds]
    else:
        seed_vars = [np.var(v, ddof=1) for v in per_seed.values()]
    names = list(scores)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if not pairing_problem(scores[a], scores[b], tasks):
                for t in tasks:
                    ca, cb = scores[a].tasks[t][0], scores[b].tasks[t][0]
                    diffs.extend(ca[k] - cb[k] for k in ca)
    seed_sd = math.sqrt(np.mean(seed_vars)) if seed_vars else math.nan
    return seed_sd, float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan


def detectable(seed_sd: float, problem_sd: float, n_seeds: int, n_problems: int, alpha: float = 1 - LEVEL,
               power: float = 0.8, seeds_paired: bool = False) -> float:
    """Smallest true difference a two-sided test at `alpha` detects with `power` (normal approximation).

    Two methods, `n_seeds` each, paired on `n_problems`: var(difference) = 2 seed_sd² / n_seeds +
    problem_sd² / n_problems; paired on seeds, `seed_sd` is already a difference's: seed_sd² / n_seeds.
    Conservative: the problem part is not divided by the seeds (a problem's true difference is the same for
    every seed) and the seed sd already holds some problem noise.
    """
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return z * math.sqrt((1 if seeds_paired else 2) * seed_sd ** 2 / n_seeds + problem_sd ** 2 / n_problems)
