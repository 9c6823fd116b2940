"""The distillation report: per student scale, method × benchmark with intervals and paired verdicts.

Rows: the student before OPD (`base`, results/eval/<student>/; with `train.student_builds: per_seed` one
evaluation per build, results/eval/<student>~build<s>/ for seed s > 0, every comparison paired on seeds) and
each method (results/train/<teacher>/<student>/<method>/K~k/ratio~r/seed~s/eval/, see opd.studies.sweep);
with several (K, ratio) points in the grid, one row per method and point. Each cell is the mean over seeds of
the accuracy with its interval over seeds and problems; each row is compared, paired on problems, with `full`
(the `full` row of the same K) and with `base`, and says better / worse / n.d. after Holm's correction over
the table's comparisons (opd.studies.stats, docs/statistics.md).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from opd.infra import cli
from opd.infra.lmeval_results import METRIC, parse_metrics
from opd.studies import eval_seeds
from opd.studies import report_stats as rs
from opd.studies import stats
from opd.studies.sweep import Run, grid, pair_label, student_build

Point = tuple[str, str, str, int, str]  # (teacher, student, method, K, ratio)


def row_name(run: Run, several: bool) -> str:
    return run.method if not several else f"{run.method} K={run.k}" + ("" if run.ratio == "1" else f" ρ={run.ratio}")


def pair_evals(runs: list[Run], tasks: list[str], metrics: dict[str, str], results: Path, several: bool,
               eval_seeds: list[int] = (0,), per_seed: bool = False) -> tuple[dict, dict]:
    """({pair label: {'base' or row name: Scores}}, {pair label: SeedScores}), rows in grid order; `per_seed`:
    the base row has one evaluation per student build (sweep.student_build), one per training seed."""
    pair_list = list(dict.fromkeys((r.teacher, r.student) for r in runs))
    out, seed_scores = {}, {}
    for teacher, student in pair_list:
        seeds = dict.fromkeys(r.seed for r in runs if r.student == student) if per_seed else [0]
        evals = [("base", s, results / "eval" / student_build(student, s, per_seed)) for s in seeds]
        evals += [(row_name(r, several), r.seed, results / r.path / "eval") for r in runs
                  if (r.teacher, r.student) == (teacher, student)]
        label = pair_label(teacher, student, pair_list)
        out[label], seed_scores[label] = rs.load_evals(evals, tasks, metrics, eval_seeds)
    return out, seed_scores


def pair_scores(runs: list[Run], tasks: list[str], metrics: dict[str, str], results: Path,
                several: bool, eval_seeds: list[int] = (0,),
                per_seed: bool = False) -> dict[str, dict[str, stats.Scores]]:
    """{pair label: {'base' or row name: Scores}}, rows in grid order."""
    return pair_evals(runs, tasks, metrics, results, several, eval_seeds, per_seed)[0]


def is_several(runs: list[Run]) -> bool:
    return len({r.k for r in runs}) > 1 or len({r.ratio for r in runs if r.ratio != "1"}) > 1


def reference_pairs(runs: list[Run], several: bool) -> list[tuple[str, str]]:
    """(row, reference) of one pair's runs: every row vs `full` of the same K (where the grid has it), vs `base`."""
    points = list(dict.fromkeys(Run(r.teacher, r.student, r.method, r.k, r.ratio, 0) for r in runs))
    out = []
    for p in points:
        full = Run(p.teacher, p.student, "full", p.k, "1", 0)
        if p.method != "full" and full in points:
            out.append((row_name(p, several), row_name(full, several)))
        out.append((row_name(p, several), "base"))
    return out


def analyse(runs: list[Run], tasks: list[str], ood_tasks: list[str], metrics: dict[str, str], results: Path,
            args: argparse.Namespace) -> tuple[dict, dict, dict, dict]:
    """(estimates {label: {row: {col: Estimate}}}, comparisons {label: [...]}, scores {label: {row: Scores}},
    spreads over evaluation seeds {label: {row: {col: Spread}}})."""
    several, pair_list = is_several(runs), list(dict.fromkeys((r.teacher, r.student) for r in runs))
    per_seed = args.student_builds == "per_seed"
    scores, seed_scores = pair_evals(runs, tasks, metrics, results, several, args.eval_seeds, per_seed)
    columns = rs.columns_of(tasks, ood_tasks)
    summary = {c: columns[c] for c in rs.SUMMARY if c in columns}
    ests, comps = {}, {}
    for teacher, student in pair_list:
        label = pair_label(teacher, student, pair_list)
        pair_runs = [r for r in runs if (r.teacher, r.student) == (teacher, student)]
        ests[label] = rs.estimates(scores[label], columns, args)
        comps[label] = stats.compare_all(scores[label], summary, reference_pairs(pair_runs, several),
                                         args.level, args.n_boot, seeds_paired=per_seed)
    return ests, comps, scores, {label: eval_seeds.spreads(seed_scores[label], columns) for label in seed_scores}


def markdown(ests: dict, comps: dict, scores: dict, columns: list[str], ind_tasks: list[str], n_seeds: int,
             args: argparse.Namespace, spreads: dict | None = None) -> str:
    summary = [c for c in rs.SUMMARY if c in columns]
    n_eval = len(args.eval_seeds)
    seeds = "" if n_eval < 2 else (f" Each checkpoint is evaluated with {n_eval} evaluation seeds: a problem counts "
                                   f"with its mean over them; (mean ± std) is over the evaluation seeds.")
    builds = ("" if args.student_builds != "per_seed" else
              " Each seed is its own build of the student (SFT seed + s), its `base` evaluated per build: "
              "comparisons are paired on seeds as well as problems.")
    parts = [f"# On-policy distillation results\n\n{n_seeds} seed(s) per method; `base` is the student before "
             f"distillation.{builds}{seeds} {rs.explain(args.level, args.n_boot)}"]
    for label, rows in ests.items():
        heads = [f"vs full ({' / '.join(summary)})", f"vs base ({' / '.join(summary)})"]
        parts.append(f"\n## {label}\n\n| method | " + " | ".join(columns + heads) + " |\n|---|"
                     + "---:|" * len(columns) + "---|---|\n")
        for name, cols in rows.items():
            ref = next((c.b for c in comps[label] if c.a == name and c.b != "base"), None)
            vs = [rs.verdict_of(comps[label], name, ref, summary) if ref else "—",
                  rs.verdict_of(comps[label], name, "base", summary) if name != "base" else "—"]
            row_spreads = (spreads or {}).get(label, {}).get(name, {})
            parts.append(f"| {name} | " + " | ".join([rs.cell(cols[c], row_spreads.get(c)) for c in columns] + vs)
                         + " |\n")
        parts.append(rs.comparisons_markdown(comps[label], args.level))
        parts.append(rs.power_markdown(scores[label], ind_tasks, args.level, args.student_builds == "per_seed"))
    return "".join(parts)


def write_csv(ests: dict, path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["student", "method", "metric", "mean", "lo", "hi", "n_seeds", "n_problems"])
        for student, rows in ests.items():
            for method, cols in rows.items():
                for col, e in cols.items():
                    w.writerow([student, method, col, *(round(100 * v, 3) for v in (e.mean, e.lo, e.hi)),
                                e.n_seeds, e.n_problems])


def plot(ests: dict, path: Path, level: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ests), figsize=(4.5 * len(ests), 3.8), squeeze=False)
    for ax, (student, rows) in zip(axes[0], ests.items()):
        methods = [m for m in rows if m != "base"]
        for offset, (col, label) in enumerate([("in_domain_avg", "in-domain avg"), ("ood", "OOD")]):
            if col not in rows["base"]:
                continue
            xs = [i + 0.4 * offset for i in range(len(methods))]
            bars = [rows[m][col] for m in methods]
            ax.bar(xs, [100 * e.mean for e in bars], 0.4, yerr=rs.error_bars(bars), label=label, capsize=3)
            b = rows["base"][col]
            ax.axhline(100 * b.mean, linestyle="--", color=f"C{offset}", linewidth=1)
            ax.axhspan(100 * b.lo, 100 * b.hi, color=f"C{offset}", alpha=0.12, linewidth=0)
        ax.set_xticks([i + 0.2 for i in range(len(methods))], methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{student} (dashed, band: before OPD; bars: {100 * level:.0f}% CI)", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The grid flags -> the config keys they stand for (opd.infra.cli; shared with opd.studies.report_sweep).
GRID_FLAGS = {"methods": "train.methods", "top_k": "train.top_k", "ratios": "train.ratio", "seeds": "train.seeds",
              "student_builds": "train.student_builds", "eval_seeds": "evaluation.seeds"}


def add_grid_args(p: argparse.ArgumentParser, figure: str = "figure") -> None:
    """Flags that name the training grid, the benchmarks and the outputs (shared with opd.studies.report_sweep)."""
    p.add_argument("--out-md", type=Path, required=True, help="Markdown report")
    p.add_argument("--out-csv", type=Path, required=True, help="CSV (long format)")
    p.add_argument("--out-png", type=Path, required=True, help=figure)
    p.add_argument("--out-comparisons", type=Path, default=None, help="CSV of every paired comparison made")
    p.add_argument("--pairs", nargs="+", required=True, metavar="TEACHER:STUDENT", help="distillation pairs")
    p.add_argument("--methods", nargs="+", required=True, help="methods, in row order")
    p.add_argument("--top-k", nargs="+", type=int, required=True, help="K values of the grid")
    p.add_argument("--ratios", nargs="+", type=float, required=True, help="selection ratios of the grid")
    p.add_argument("--seeds", nargs="+", type=int, required=True, help="seeds to average over")
    p.add_argument("--student-builds", choices=("shared", "per_seed"), default="shared",
                   help="per_seed: seed s > 0 of a student started from its own build <student>~build<s> "
                        "(config train.student_builds); comparisons are then paired on seeds")
    p.add_argument("--tasks", nargs="+", required=True, help="benchmarks, in column order")
    p.add_argument("--ood-tasks", nargs="*", required=True, help="benchmarks that count as out-of-domain")
    p.add_argument("--metric", nargs="*", default=[], metavar="TASK=METRIC",
                   help=f"lm-eval metric key per task where it is not {METRIC!r}")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root")
    p.add_argument("--study", default="miniature", help="MLflow experiment name")
    rs.add_stats_args(p)


def grid_runs(args: argparse.Namespace) -> list[Run]:
    pair_list = []
    for item in args.pairs:
        teacher, sep, student = item.partition(":")
        if not sep:
            raise ValueError(f"--pairs {item!r}: expected TEACHER:STUDENT")
        pair_list.append((teacher, student))
    return grid(pair_list, args.methods, args.top_k, args.ratios, args.seeds)


def log_report(args: argparse.Namespace, rule: str, ests: dict, comps: dict, params: dict) -> None:
    """The report run in MLflow: every interval and comparison, and the report files."""
    from opd.infra import tracking

    with tracking.run(args.study, rule, params={**params, "level": args.level, "n_boot": args.n_boot}) as run:
        for label in ests:
            run.log_metrics(rs.mlflow_metrics(f"{label}.", ests[label], comps.get(label, [])))
        for path in (args.out_md, args.out_csv, args.out_png, args.out_comparisons):
            if path is not None:
                run.log_artifact(path)


def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser(description="Tabulate OPD results per student: method x benchmark.")
    add_grid_args(p)
    args = cli.parse(p, argv, GRID_FLAGS)
    ests, comps, scores, spreads = analyse(grid_runs(args), args.tasks, args.ood_tasks, parse_metrics(args.metric),
                                           args.results, args)
    columns = list(rs.columns_of(args.tasks, args.ood_tasks))
    ind = [t for t in args.tasks if t not in args.ood_tasks]
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(markdown(ests, comps, scores, columns, ind, len(args.seeds), args, spreads))
    write_csv(ests, args.out_csv)
    if args.out_comparisons is not None:
        rs.write_comparisons_csv(comps, args.out_comparisons)
    plot(ests, args.out_png, args.level)
    log_report(args, "report_training", ests, comps, {"methods": args.methods, "seeds": args.seeds})
    print(args.out_md.read_text())


if __name__ == "__main__":
    cli.run(main)
