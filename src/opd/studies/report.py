"""The study report: a model x benchmark table (Markdown + CSV) with in-domain average and OOD, a figure.

Reads the lm-eval results JSON of every (model, task) pair. In-domain average is the unweighted mean
over the in-domain benchmarks that were evaluated; OOD is the mean over the out-of-domain ones.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from opd.infra.lmeval_results import METRIC, parse_metrics, read_score


def summary_row(by_task: dict[str, float], tasks: list[str], ood_tasks: list[str]) -> dict[str, float]:
    """Accuracies in percent plus in_domain_avg (mean of the non-OOD tasks) and ood (mean of the OOD ones)."""
    row = {t: 100 * by_task[t] for t in tasks}
    ind = [row[t] for t in tasks if t not in ood_tasks]
    ood = [row[t] for t in tasks if t in ood_tasks]
    row["in_domain_avg"] = sum(ind) / len(ind) if ind else float("nan")
    row["ood"] = sum(ood) / len(ood) if ood else float("nan")
    return row


def build_table(scores: dict[str, dict[str, float]], tasks: list[str],
                ood_tasks: list[str]) -> list[dict]:
    """Rows {model, <task>..., in_domain_avg, ood}; accuracies in percent, averages of what exists."""
    return [{"model": model, **summary_row(by_task, tasks, ood_tasks)} for model, by_task in scores.items()]


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|\n"
    body = "".join(
        "| " + " | ".join(str(r[c]) if c == "model" else f"{r[c]:.1f}" for c in columns) + " |\n" for r in rows
    )
    return head + body


def write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: (r[c] if c == "model" else round(r[c], 2)) for c in columns} for r in rows)


def plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [row[t] for t in tasks], width, label=row["model"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Models before distillation")
    ax.legend(fontsize=8, ncols=len(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tabulate lm-eval results: model x benchmark.")
    parser.add_argument("--results-dir", type=Path, required=True, help="holds <model>/<task>.json")
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
    args = parser.parse_args(argv)

    from opd.infra import tracking

    metrics = parse_metrics(args.metric)
    scores = {m: {t: read_score(args.results_dir / m / f"{t}.json", t, metrics.get(t, METRIC)) for t in args.tasks}
              for m in args.models}
    rows = build_table(scores, args.tasks, args.ood_tasks)
    columns = ["model", *args.tasks, "in_domain_avg", "ood"]
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(to_markdown(rows, columns))
    write_csv(rows, columns, args.out_csv)
    plot(rows, args.tasks, args.out_png)
    with tracking.run(args.study, "report", params={"models": args.models, "tasks": args.tasks}) as run:
        run.log_metrics({f"{r['model']}.{c}": r[c] for r in rows for c in columns[1:]})
        for path in (args.out_md, args.out_csv, args.out_png):
            run.log_artifact(path)
    print(args.out_md.read_text())


if __name__ == "__main__":
    main()
