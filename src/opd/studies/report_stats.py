"""What the report tables share about uncertainty: per-problem results in, intervals and verdicts out.

Reads each evaluation's <task>.samples.jsonl into opd.studies.stats rows, and formats what opd.studies.stats
computes: cells "mean [lo, hi]" (accuracy %), comparison tables, CSV rows, MLflow metrics, a power table.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from opd.infra.lmeval_results import METRIC
from opd.studies import eval_seeds as eval_seeds_mod
from opd.studies import stats

MARK = {"better": "▲", "worse": "▼", "n.d.": ""}


def add_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--level", type=float, default=stats.LEVEL,
                   help="confidence level of the intervals; verdicts test at 1 - level after Holm")
    p.add_argument("--n-boot", type=int, default=stats.N_BOOT, help="bootstrap replicates per estimate")
    p.add_argument("--eval-seeds", nargs="+", type=int, default=[0],
                   help="evaluation seeds of every evaluation (config evaluation.seeds): a problem's score is its mean")


def load_evals(evals: list[tuple[str, object, Path]], tasks: list[str], metrics: dict[str, str],
               eval_seeds: list[int] = (0,)) -> tuple[dict[str, stats.Scores], eval_seeds_mod.SeedScores]:
    """({row name: Scores}, per-evaluation-seed accuracies) from (row name, seed, eval dir) triples.

    Each eval dir holds <task>.samples.jsonl per evaluation seed (opd.infra.lmeval_results.eval_seed_dir);
    a problem's score is its mean over the evaluation seeds (opd.studies.eval_seeds).
    """
    runs = {(name, seed): str(eval_dir) for name, seed, eval_dir in evals}
    rows, seed_scores = [], {}
    for task in tasks:
        read = []
        for name, seed, d in evals:
            means, accuracy = eval_seeds_mod.read_problem_means(d, task, metrics.get(task, METRIC), list(eval_seeds))
            eval_seeds_mod.add(seed_scores, name, task, accuracy)
            read.append((name, seed, means))
        # Problems are "doc_id:doc_hash"; files written before doc_hash was kept have bare doc_ids. Where
        # any evaluation of the task lacks the hash, pair on doc_id alone rather than on nothing.
        bare = any(":" not in k for _, _, got in read for k in got)
        rows += [(name, seed, task, k.partition(":")[0] if bare else k, c)
                 for name, seed, got in read for k, c in got.items()]
    return stats.group(rows, runs), seed_scores


def load_scores(evals: list[tuple[str, object, Path]], tasks: list[str], metrics: dict[str, str],
                eval_seeds: list[int] = (0,)) -> dict[str, stats.Scores]:
    """{row name: Scores} from (row name, seed, eval dir) triples (load_evals without the per-seed part)."""
    return load_evals(evals, tasks, metrics, eval_seeds)[0]


def columns_of(tasks: list[str], ood_tasks: list[str]) -> dict[str, list[str]]:
    """Each benchmark alone, the in-domain average and the OOD average (where there are such tasks)."""
    cols = {t: [t] for t in tasks}
    ind, ood = [t for t in tasks if t not in ood_tasks], [t for t in tasks if t in ood_tasks]
    if ind:
        cols["in_domain_avg"] = ind
    if ood:
        cols["ood"] = ood
    return cols


SUMMARY = ("in_domain_avg", "ood")  # the columns the verdicts are about


def estimates(scores: dict[str, stats.Scores], columns: dict[str, list[str]],
              args: argparse.Namespace) -> dict[str, dict[str, stats.Estimate]]:
    return {name: {col: stats.estimate(s, tasks, args.level, args.n_boot) for col, tasks in columns.items()}
            for name, s in scores.items()}


def cell(e: stats.Estimate | None, spread: eval_seeds_mod.Spread | None = None) -> str:
    """'mean [lo, hi]' (%), and with several evaluation seeds '(mean ± std)' over them as TA-OPD prints it."""
    if e is None:
        return "—"
    seeds = eval_seeds_mod.text(spread)
    return f"{100 * e.mean:.1f} [{100 * e.lo:.1f}, {100 * e.hi:.1f}]" + (f" ({seeds})" if seeds else "")


def verdict_of(comps: list[stats.Comparison], a: str, b: str, columns) -> str:
    """'better / n.d.' for `a` vs `b` over `columns` ('—' where no such comparison was made)."""
    found = {(c.a, c.b, c.column): c.verdict for c in comps}
    return " / ".join(found.get((a, b, col), "—") for col in columns)


def comparisons_markdown(comps: list[stats.Comparison], level: float) -> str:
    """The comparisons a table makes: difference (points) with its interval, p, Holm-adjusted p, verdict."""
    if not comps:
        return ""
    out = [f"\n| comparison | column | difference [{100 * level:.0f}% CI] | p | Holm p | verdict |\n"
           "|---|---|---:|---:|---:|---|\n"]
    for c in comps:
        out.append(f"| {c.a} − {c.b} | {c.column} | {100 * c.diff:+.1f} [{100 * c.lo:+.1f}, {100 * c.hi:+.1f}]"
                   f"{'' if c.paired else ' (unpaired)'} | {c.p:.3f} | {c.p_holm:.3f} | {c.verdict} |\n")
    notes = sorted({c.note for c in comps if c.note})
    out.extend(f"\n**Not paired** ({n.removeprefix('not paired: ')}): these comparisons resample the two "
               "evaluations' problems independently.\n" for n in notes)
    return "".join(out)


def explain(level: float, n_boot: int, comparisons: bool = True) -> str:
    cells = (f"Cells: accuracy (%) and its {100 * level:.0f}% interval (two-way bootstrap over seeds and problems, "
             f"{n_boot} replicates; docs/statistics.md).")
    return cells + (f" Comparisons are paired on problems; verdicts (better / worse / n.d. = not distinguishable) "
                    f"test at {1 - level:.2f} after Holm's correction over every comparison of the table."
                    if comparisons else "") + "\n"


def write_comparisons_csv(comps_by_table: dict[str, list[stats.Comparison]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["table", "a", "b", "metric", "diff", "lo", "hi", "p", "p_holm", "verdict", "paired", "note"])
        for table, comps in comps_by_table.items():
            for c in comps:
                w.writerow([table, c.a, c.b, c.column, *(round(100 * v, 3) for v in (c.diff, c.lo, c.hi)),
                            round(c.p, 5), round(c.p_holm, 5), c.verdict, c.paired, c.note])


def mlflow_metrics(prefix: str, ests: dict[str, dict[str, stats.Estimate]],
                   comps: list[stats.Comparison]) -> dict[str, float]:
    """{prefix.row.column.mean/lo/hi: %} and {prefix.a_vs_b.column.diff/lo/hi/p/p_holm}."""
    out = {}
    for name, cols in ests.items():
        for col, e in cols.items():
            out.update({f"{prefix}{name}.{col}.{k}": 100 * getattr(e, k) for k in ("mean", "lo", "hi")})
    for c in comps:
        key = f"{prefix}{c.a}_vs_{c.b}.{c.column}"
        out.update({f"{key}.{k}": 100 * getattr(c, k) for k in ("diff", "lo", "hi")})
        out.update({f"{key}.p": c.p, f"{key}.p_holm": c.p_holm, f"{key}.paired": float(c.paired)})
    return out


def power_markdown(scores: dict[str, stats.Scores], tasks: list[str], level: float,
                   seeds_paired: bool = False) -> str:
    """How large a true difference the measured noise lets 1-5 seeds x N problems detect (80% power);
    `seeds_paired`: seeds are student builds shared by every row (train.student_builds: per_seed)."""
    seed_sd, problem_sd = stats.noise(scores, tasks, seeds_paired)
    if not problem_sd > 0:  # nan (nothing pairs) or 0 (every evaluation agrees on every problem): nothing to say
        return ""
    n = sum(len(next(iter(scores.values())).tasks[t][0]) for t in tasks)
    sd_note = "no method with several seeds: seed sd taken as 0, so the table is optimistic" \
        if math.isnan(seed_sd) else \
        f"seed sd {'of a paired difference (per build) ' if seeds_paired else ''}{100 * seed_sd:.1f} points"
    seed_sd = 0.0 if math.isnan(seed_sd) else seed_sd
    sizes = [n, 2 * n, 5 * n]
    out = [f"\n**Power** (in-domain average; measured noise: {sd_note}, per-problem sd of a paired difference "
           f"{problem_sd:.2f}): the smallest difference (points) a test at {1 - level:.2f} detects with 80% "
           "power, by seeds per method and problems.\n\n| seeds | " + " | ".join(f"{m} problems" for m in sizes)
           + " |\n|---|" + "---:|" * len(sizes) + "\n"]
    for s in (1, 3, 5):
        cells = [100 * stats.detectable(seed_sd, problem_sd, s, m, 1 - level, seeds_paired=seeds_paired) for m in sizes]
        out.append(f"| {s} | " + " | ".join(f"{c:.1f}" for c in cells) + " |\n")
    return "".join(out)


def error_bars(ests: list[stats.Estimate]) -> list[list[float]]:
    """matplotlib's asymmetric yerr (points) from intervals."""
    return [[100 * (e.mean - e.lo) for e in ests], [100 * (e.hi - e.mean) for e in ests]]
