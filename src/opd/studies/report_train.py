"""The distillation report: per student scale, method × benchmark, mean ± sd over seeds.

Rows: the student before OPD (`base`, results/eval/<student>/) and each method
(results/train/<teacher>/<student>/<method>/K~k/ratio~r/seed~s/eval/, see opd.studies.sweep); with several (K, ratio)
points in the grid, one row per method and point. In-domain average and OOD are computed per
seed first, then averaged, so their sd is the spread across seeds. sd is the sample sd (n − 1); with one
seed it is reported as 0.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from opd.infra.lmeval_results import METRIC, parse_metrics, read_score
from opd.studies.report import summary_row
from opd.studies.sweep import Run, grid, pair_label

Point = tuple[str, str, str, int, str]  # (teacher, student, method, K, ratio)


def mean_sd(rows: list[dict[str, float]]) -> dict[str, tuple[float, float, int]]:
    """(mean, sd, n) per column over seeds."""
    out = {}
    for col in rows[0]:
        vals = [r[col] for r in rows]
        out[col] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))
    return out


def eval_row(eval_dir: Path, tasks: list[str], ood_tasks: list[str], metrics: dict[str, str]) -> dict[str, float]:
    scores = {t: read_score(eval_dir / f"{t}.json", t, metrics.get(t, METRIC)) for t in tasks}
    return summary_row(scores, tasks, ood_tasks)


def collect_runs(runs: list[Run], tasks: list[str], ood_tasks: list[str], metrics: dict[str, str],
                 results: Path) -> dict[Point, dict]:
    """{(teacher, student, method, K, ratio): {column: (mean, sd, n over seeds)}}."""
    by_point: dict[Point, list[dict]] = {}
    for r in runs:
        row = eval_row(results / r.path / "eval", tasks, ood_tasks, metrics)
        by_point.setdefault((r.teacher, r.student, r.method, r.k, r.ratio), []).append(row)
    return {point: mean_sd(rows) for point, rows in by_point.items()}


def collect(runs: list[Run], tasks, ood_tasks, metrics, results: Path) -> dict[str, dict[str, dict]]:
    """{pair label: {'base' or method (with K, ratio when the grid has several points): stats}}."""
    pair_list = list(dict.fromkeys((r.teacher, r.student) for r in runs))
    points = collect_runs(runs, tasks, ood_tasks, metrics, results)
    ks, ratios = {p[3] for p in points}, {p[4] for p in points if p[4] != "1"}
    several = len(ks) > 1 or len(ratios) > 1
    table: dict[str, dict[str, dict]] = {}
    for teacher, student in pair_list:
        rows = {"base": mean_sd([eval_row(results / "eval" / student, tasks, ood_tasks, metrics)])}
        for (t, s, method, k, ratio), stats in points.items():
            if (t, s) == (teacher, student):
                name = method if not several else f"{method} K={k}" + ("" if ratio == "1" else f" ρ={ratio}")
                rows[name] = stats
        table[pair_label(teacher, student, pair_list)] = rows
    return table


def markdown(table: dict[str, dict[str, dict]], columns: list[str], n_seeds: int) -> str:
    parts = [f"# On-policy distillation results\n\nAccuracy (%), mean ± sd over {n_seeds} seed(s); "
             "`base` is the student before distillation.\n"]
    for student, rows in table.items():
        parts.append(f"\n## {student}\n\n| method | " + " | ".join(columns) + " |\n|---|"
                     + "---:|" * len(columns) + "\n")
        for method, cols in rows.items():
            cells = [f"{cols[c][0]:.1f} ± {cols[c][1]:.1f}" for c in columns]
            parts.append(f"| {method} | " + " | ".join(cells) + " |\n")
    return "".join(parts)


def write_csv(table: dict, path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["student", "method", "metric", "mean", "sd", "n_seeds"])
        for student, rows in table.items():
            for method, cols in rows.items():
                for col, (m, sd, n) in cols.items():
                    w.writerow([student, method, col, round(m, 3), round(sd, 3), n])


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(4.5 * len(table), 3.8), squeeze=False)
    for ax, (student, rows) in zip(axes[0], table.items()):
        methods = [m for m in rows if m != "base"]
        for offset, (col, label) in enumerate([("in_domain_avg", "in-domain avg"), ("ood", "OOD")]):
            xs = [i + 0.4 * offset for i in range(len(methods))]
            ax.bar(xs, [rows[m][col][0] for m in methods], 0.4, yerr=[rows[m][col][1] for m in methods],
                   label=label, capsize=3)
            ax.axhline(rows["base"][col][0], linestyle="--", color=f"C{offset}", linewidth=1)
        ax.set_xticks([i + 0.2 for i in range(len(methods))], methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{student} (dashed: before OPD)", fontsize=9)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_grid_args(p: argparse.ArgumentParser, figure: str = "figure") -> None:
    """Flags that name the training grid, the benchmarks and the outputs (shared with opd.studies.report_sweep)."""
    p.add_argument("--out-md", type=Path, required=True, help="Markdown report")
    p.add_argument("--out-csv", type=Path, required=True, help="CSV (long format)")
    p.add_argument("--out-png", type=Path, required=True, help=figure)
    p.add_argument("--pairs", nargs="+", required=True, metavar="TEACHER:STUDENT", help="distillation pairs")
    p.add_argument("--methods", nargs="+", required=True, help="methods, in row order")
    p.add_argument("--top-k", nargs="+", type=int, required=True, help="K values of the grid")
    p.add_argument("--ratios", nargs="+", type=float, required=True, help="selection ratios of the grid")
    p.add_argument("--seeds", nargs="+", type=int, required=True, help="seeds to average over")
    p.add_argument("--tasks", nargs="+", required=True, help="benchmarks, in column order")
    p.add_argument("--ood-tasks", nargs="*", required=True, help="benchmarks that count as out-of-domain")
    p.add_argument("--metric", nargs="*", default=[], metavar="TASK=METRIC",
                   help=f"lm-eval metric key per task where it is not {METRIC!r}")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root")
    p.add_argument("--study", default="miniature", help="MLflow experiment name")


def grid_runs(args: argparse.Namespace) -> list[Run]:
    pair_list = []
    for item in args.pairs:
        teacher, sep, student = item.partition(":")
        if not sep:
            raise ValueError(f"--pairs {item!r}: expected TEACHER:STUDENT")
        pair_list.append((teacher, student))
    return grid(pair_list, args.methods, args.top_k, args.ratios, args.seeds)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Tabulate OPD results per student: method x benchmark.")
    add_grid_args(p)
    args = p.parse_args(argv)
    from opd.infra import tracking

    table = collect(grid_runs(args), args.tasks, args.ood_tasks, parse_metrics(args.metric), args.results)
    columns = [*args.tasks, "in_domain_avg", "ood"]
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(markdown(table, columns, len(args.seeds)))
    write_csv(table, args.out_csv)
    plot(table, args.out_png)
    with tracking.run(args.study, "report_training", params={"methods": args.methods, "seeds": args.seeds}) as run:
        run.log_metrics({f"{s}.{m}.{c}": v[0] for s, rows in table.items() for m, cols in rows.items()
                         for c, v in cols.items() if c in ("in_domain_avg", "ood")})
        for path in (args.out_md, args.out_csv, args.out_png):
            run.log_artifact(path)
    print(args.out_md.read_text())


if __name__ == "__main__":
    main()
