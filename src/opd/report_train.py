"""The distillation report: per student scale, method × benchmark, mean ± sd over seeds.

Rows: the student before OPD (`base`, results/eval/<student>/) and each method
(results/train/<student>/<method>/K~k/ratio~r/seed~s/eval/). In-domain average and OOD are computed per
seed first, then averaged, so their sd is the spread across seeds. sd is the sample sd (n − 1); with one
seed it is reported as 0.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from opd.report import read_score
from opd.toy import IN_DOMAIN, OUT_OF_DOMAIN


def per_seed_row(scores: dict[str, float], tasks: list[str]) -> dict[str, float]:
    """Accuracies in percent plus in_domain_avg and ood for one evaluated model."""
    row = {t: 100 * scores[t] for t in tasks}
    ind = [row[t] for t in tasks if t in IN_DOMAIN]
    ood = [row[t] for t in tasks if t in OUT_OF_DOMAIN]
    row["in_domain_avg"] = sum(ind) / len(ind) if ind else float("nan")
    row["ood"] = sum(ood) / len(ood) if ood else float("nan")
    return row


def mean_sd(rows: list[dict[str, float]]) -> dict[str, tuple[float, float, int]]:
    """(mean, sd, n) per column over seeds."""
    out = {}
    for col in rows[0]:
        vals = [r[col] for r in rows]
        out[col] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))
    return out


def collect(students, methods, seeds, tasks, k, ratio, results: Path) -> dict[str, dict[str, dict]]:
    """{student: {method or 'base': {column: (mean, sd, n)}}}."""
    table: dict[str, dict[str, dict]] = {}
    for student in students:
        base = {t: read_score(results / "eval" / student / f"{t}.json", t) for t in tasks}
        table[student] = {"base": mean_sd([per_seed_row(base, tasks)])}
        for method in methods:
            rows = []
            for seed in seeds:
                d = results / "train" / student / method / f"K~{k}" / f"ratio~{ratio}" / f"seed~{seed}" / "eval"
                rows.append(per_seed_row({t: read_score(d / f"{t}.json", t) for t in tasks}, tasks))
            table[student][method] = mean_sd(rows)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Tabulate OPD results per student: method x benchmark.")
    p.add_argument("--students", nargs="+", required=True, help="student names")
    p.add_argument("--methods", nargs="+", required=True, help="methods, in row order")
    p.add_argument("--seeds", nargs="+", type=int, required=True, help="seeds to average over")
    p.add_argument("--tasks", nargs="+", required=True, help="benchmarks, in column order")
    p.add_argument("--k", type=int, required=True, help="K of the runs")
    p.add_argument("--ratio", required=True, help="ratio of the runs, as written in their paths")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root")
    p.add_argument("--out-md", type=Path, required=True, help="Markdown report")
    p.add_argument("--out-csv", type=Path, required=True, help="CSV (long format)")
    p.add_argument("--out-png", type=Path, required=True, help="figure")
    p.add_argument("--study", default="miniature", help="MLflow experiment name")
    args = p.parse_args(argv)
    from opd import tracking

    table = collect(args.students, args.methods, args.seeds, args.tasks, args.k, args.ratio, args.results)
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
