"""The study report: a model x benchmark table (Markdown + CSV) with in-domain average and OOD, a figure.

Reads the per-problem results (<task>.samples.jsonl, checked against lm-eval's <task>.json) of every
(model, task) pair. In-domain average is the unweighted mean over the in-domain benchmarks that were
evaluated; OOD is the mean over the out-of-domain ones. Each cell carries its interval over problems
(opd.studies.stats, docs/statistics.md); with several evaluation seeds a problem counts with its mean over
them, and the cell adds the mean ± std over the seeds (opd.studies.eval_seeds).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from opd.infra import cli
from opd.infra.lmeval_results import METRIC, parse_metrics, read_unfinished_rate
from opd.studies import eval_seeds
from opd.studies import report_stats as rs
from opd.studies.stats import Estimate


def to_markdown(ests: dict[str, dict[str, Estimate]], columns: list[str], level: float, n_boot: int,
                spreads: dict | None = None) -> str:
    """The table; `spreads` ({model: {column: Spread}}, opd.studies.eval_seeds) adds mean ± std over evaluation seeds."""
    spreads = spreads or {}
    head = "| model | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    body = "".join(f"| {m} | " + " | ".join(rs.cell(cols[c], spreads.get(m, {}).get(c)) for c in columns) + " |\n"
                   for m, cols in ests.items())
    return rs.explain(level, n_boot, comparisons=False) + "\n" + head + body


def unfinished_table(results_dir: Path, models: list[str], tasks: list[str]) -> str:
    """Markdown: % of responses whose thinking never closed (they score 0), per model and task; "" without thinking."""
    rates = {m: [read_unfinished_rate(results_dir / m / f"{t}.json") for t in tasks] for m in models}
    if all(v is None for row in rates.values() for v in row):
        return ""
    head = "| model | " + " | ".join(tasks) + " |\n|---|" + "---:|" * len(tasks) + "\n"
    body = "".join(f"| {m} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in row) + " |\n"
                   for m, row in rates.items())
    return ("\nUnfinished thinking: % of responses that never closed </think> within max_gen_toks (scored 0,"
            " docs/paper.md).\n\n" + head + body)


def write_csv(ests: dict[str, dict[str, Estimate]], columns: list[str], path: Path) -> None:
    """One row per model: the estimates (%) first, then each column's interval bounds."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", *columns, *(f"{c}_{b}" for c in columns for b in ("lo", "hi"))])
        for m, cols in ests.items():
            writer.writerow([m, *(round(100 * cols[c].mean, 2) for c in columns),
                             *(round(100 * getattr(cols[c], b), 2) for c in columns for b in ("lo", "hi"))])


def plot(ests: dict[str, dict[str, Estimate]], tasks: list[str], path: Path, level: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(1, len(ests))
    for i, (model, cols) in enumerate(ests.items()):
        xs = [j + i * width for j in range(len(tasks))]
        row = [cols[t] for t in tasks]
        ax.bar(xs, [100 * e.mean for e in row], width, yerr=rs.error_bars(row), capsize=2, label=model)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Models before distillation (bars: {100 * level:.0f}% intervals over problems)", fontsize=9)
    ax.legend(fontsize=8, ncols=len(ests))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Tabulate lm-eval results: model x benchmark, with intervals.")
    parser.add_argument("--results-dir", type=Path, required=True,
                        help="holds <model>/<task>.json and <model>/<task>.samples.jsonl")
    parser.add_argument("--models", nargs="+", required=True, help="models, in table order")
    parser.add_argument("--tasks", nargs="+", required=True, help="tasks, in column order")
    parser.add_argument("--ood-tasks", nargs="*", required=True,
                        help="tasks that count as out-of-domain (the rest make the in-domain average)")
    parser.add_argument("--metric", nargs="*", default=[], metavar="TASK=METRIC",
                        help=f"lm-eval metric key per task where it is not {METRIC!r}")
    parser.add_argument("--out-md", type=Path, required=True, help="Markdown table to write")
    parser.add_argument("--out-csv", type=Path, required=True, help="CSV table to write")
    parser.add_argument("--out-png", type=Path, required=True, help="bar chart to write")
    parser.add_argument("--study", default="miniature", help="MLflow experiment name")
    rs.add_stats_args(parser)
    args = cli.parse(parser, argv, {"eval_seeds": "evaluation.seeds"})

    from opd.infra import tracking

    scores, seed_scores = rs.load_evals([(m, 0, args.results_dir / m) for m in args.models], args.tasks,
                                        parse_metrics(args.metric), args.eval_seeds)
    columns = rs.columns_of(args.tasks, args.ood_tasks)
    ests = rs.estimates(scores, columns, args)
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(to_markdown(ests, list(columns), args.level, args.n_boot,
                                       eval_seeds.spreads(seed_scores, columns))
                           + unfinished_table(args.results_dir, args.models, args.tasks))
    write_csv(ests, list(columns), args.out_csv)
    plot(ests, args.tasks, args.out_png, args.level)
    with tracking.run(args.study, "report", params={"models": args.models, "tasks": args.tasks,
                                                    "level": args.level, "n_boot": args.n_boot}) as run:
        run.log_metrics({**rs.mlflow_metrics("", ests, []), **eval_seeds.mlflow_metrics("", seed_scores)})
        for path in (args.out_md, args.out_csv, args.out_png):
            run.log_artifact(path)
    print(args.out_md.read_text())


if __name__ == "__main__":
    cli.run(main)
