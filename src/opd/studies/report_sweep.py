"""The sweep report: per (teacher, student) pair and method, a K x ratio table and heatmap.

Cells are the in-domain average and the OOD score (accuracy %, mean over seeds with its interval over seeds
and problems, opd.studies.stats). `full` and `release` have no ratio (opd.studies.sweep): they get one
column, `all`. The `base` line under each table is the student before distillation, the number every
cell should beat: each cell is compared with it (paired on problems, Holm over every cell of the pair's
tables) and marked ▲ (better) or ▼ (worse) where the difference is distinguishable.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from opd.infra.lmeval_results import parse_metrics
from opd.studies import report_stats as rs
from opd.studies import stats
from opd.infra import cli
from opd.studies.report_train import GRID_FLAGS, add_grid_args, grid_runs, log_report, pair_scores, row_name
from opd.studies.sweep import Run, fmt_ratio, method_ratios, pair_label

COLUMNS = (("in_domain_avg", "in-domain avg"), ("ood", "OOD"))


def analyse(runs: list[Run], scores: dict, columns: dict[str, list[str]], args) -> tuple[dict, dict, dict]:
    """(tables {label: {method: {col: {(K, ratio): (Estimate, verdict vs base)}}}, base {label: {col: Estimate}},
    comparisons {label: [every cell vs base]})."""
    pair_list = list(dict.fromkeys((r.teacher, r.student) for r in runs))
    summary = {c: columns[c] for c, _ in COLUMNS if c in columns}
    tables, base, comps = {}, {}, {}
    for teacher, student in pair_list:
        label = pair_label(teacher, student, pair_list)
        points = list(dict.fromkeys(Run(teacher, student, r.method, r.k, r.ratio, 0) for r in runs
                                    if (r.teacher, r.student) == (teacher, student)))
        by_row = scores[label]
        comps[label] = stats.compare_all(by_row, summary, [(row_name(p, True), "base") for p in points],
                                         args.level, args.n_boot)
        verdicts = {(c.a, c.column): c.verdict for c in comps[label]}
        base[label] = {c: stats.estimate(by_row["base"], t, args.level, args.n_boot) for c, t in summary.items()}
        for p in points:
            name = row_name(p, True)
            for col, tasks in summary.items():
                e = stats.estimate(by_row[name], tasks, args.level, args.n_boot)
                cells = tables.setdefault(label, {}).setdefault(p.method, {}).setdefault(col, {})
                cells[(p.k, p.ratio)] = (e, verdicts[(name, col)])
    return tables, base, comps


def markdown(tables: dict, base: dict, comps: dict, ks, ratios, n_seeds: int, args) -> str:
    parts = [f"# Sweep report\n\n{n_seeds} seed(s) per point. Rows: K; columns: selection ratio ρ (`all` for "
             f"methods without a budget). ▲ / ▼: better / worse than before distillation. "
             f"{rs.explain(args.level, args.n_boot)}"]
    for label, methods in tables.items():
        parts.append(f"\n## {label}\n\nBefore distillation: " + ", ".join(
            f"{title} {rs.cell(base[label][col])}" for col, title in COLUMNS if col in base[label]) + ".\n")
        for method, cells in methods.items():
            cols = method_ratios(method, ratios)
            heads = ["all" if c == "1" else f"ρ={c}" for c in cols]
            for col, title in COLUMNS:
                if col not in cells:
                    continue
                parts.append(f"\n**{method}: {title}**\n\n| K | " + " | ".join(heads) + " |\n|---|"
                             + "---:|" * len(cols) + "\n")
                for k in ks:
                    vals = [cells[col].get((int(k), c)) for c in cols]
                    parts.append(f"| {k} | " + " | ".join("—" if v is None else f"{rs.cell(v[0])} {rs.MARK[v[1]]}"
                                                          .rstrip() for v in vals) + " |\n")
        parts.append("\n<details><summary>every cell vs base</summary>\n"
                     + rs.comparisons_markdown(comps[label], args.level) + "\n</details>\n")
    return "".join(parts)


def write_csv(tables: dict, path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pair", "method", "K", "ratio", "metric", "mean", "lo", "hi", "n_seeds", "vs_base"])
        for label, methods in tables.items():
            for method, cells in methods.items():
                for col, values in cells.items():
                    for (k, ratio), (e, v) in values.items():
                        w.writerow([label, method, k, ratio, col, *(round(100 * x, 3) for x in (e.mean, e.lo, e.hi)),
                                    e.n_seeds, v])


def _heatmap(ax, fig, grid, marks, centre: float, ks, cols) -> None:
    """One K x ratio heatmap centred on the base score; cells that differ from the base get a frame and ▲/▼."""
    from matplotlib.patches import Rectangle

    span = max([abs(v - centre) for row in grid for v in row if not math.isnan(v)] + [1.0])
    im = ax.imshow(grid, cmap="RdBu", vmin=centre - span, vmax=centre + span)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            dark = not math.isnan(v) and abs(v - centre) > 0.6 * span  # white on deep colours
            mark = rs.MARK.get(marks[i][j], "")
            ax.text(j, i, "—" if math.isnan(v) else f"{v:.1f}{mark}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
            if mark:
                ax.add_patch(Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, linewidth=1.5))
    ax.set_xticks(range(len(cols)), ["all" if c == "1" else c for c in cols], fontsize=7)
    ax.set_yticks(range(len(ks)), [str(k) for k in ks], fontsize=7)
    ax.set_xlabel("ratio ρ", fontsize=7)
    ax.set_ylabel("K", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)


def plot(tables: dict, base: dict, ks, ratios, path: Path) -> None:
    """One figure: a row of heatmaps per (pair, method), in-domain and OOD side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, method, cells) for label, methods in tables.items() for method, cells in methods.items()]
    fig, axes = plt.subplots(len(rows), 2, figsize=(2.2 + 1.1 * len(ratios) * 2, 0.9 + 1.0 * len(ks) * len(rows)),
                             squeeze=False)
    for (label, method, cells), ax_row in zip(rows, axes):
        cols = method_ratios(method, ratios)
        for ax, (col, title) in zip(ax_row, COLUMNS):
            if col not in cells:
                ax.axis("off")
                continue
            got = [[cells[col].get((int(k), c)) for c in cols] for k in ks]
            grid = [[math.nan if v is None else 100 * v[0].mean for v in row] for row in got]
            marks = [["" if v is None else v[1] for v in row] for row in got]
            centre = 100 * base[label][col].mean
            _heatmap(ax, fig, grid, marks, centre, ks, cols)
            ax.set_title(f"{label} · {method} · {title} (base {centre:.1f}; ▲▼ framed: differs)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser(description="K x ratio tables and heatmaps of an OPD sweep.")
    add_grid_args(p, figure="heatmaps")
    args = cli.parse(p, argv, GRID_FLAGS)
    runs = grid_runs(args)
    columns = rs.columns_of(args.tasks, args.ood_tasks)
    scores = pair_scores(runs, args.tasks, parse_metrics(args.metric), args.results, True, args.eval_seeds,
                         args.student_builds == "per_seed")
    tables, base, comps = analyse(runs, scores, columns, args)
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(markdown(tables, base, comps, args.top_k, args.ratios, len(args.seeds), args))
    write_csv(tables, args.out_csv)
    if args.out_comparisons is not None:
        rs.write_comparisons_csv(comps, args.out_comparisons)
    plot(tables, base, args.top_k, [fmt_ratio(r) for r in args.ratios], args.out_png)
    ests = {label: {f"{m} K={k}" + ("" if r == "1" else f" ρ={r}"): {col: cells[col][(k, r)][0] for col in cells}
                    for m, cells in methods.items() for k, r in next(iter(cells.values()))}
            for label, methods in tables.items()}
    log_report(args, "report_sweep", ests, comps, {"top_k": args.top_k, "ratios": args.ratios})
    print(args.out_md.read_text())


if __name__ == "__main__":
    cli.run(main)
