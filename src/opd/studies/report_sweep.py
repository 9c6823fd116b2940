"""The sweep report: per (teacher, student) pair and method, a K x ratio table and heatmap.

Cells are the in-domain average and the OOD score (accuracy %, mean ± sd over seeds; each seed's averages
are taken first, see opd.studies.report_train). `full` and `release` have no ratio (opd.studies.sweep): they get one
column, `all`. The `base` line under each table is the student before distillation, the number every
cell should beat.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from opd.infra.lmeval_results import parse_metrics
from opd.studies.report_train import Point, add_grid_args, collect_runs, eval_row, grid_runs
from opd.studies.sweep import fmt_ratio, method_ratios, pair_label

COLUMNS = (("in_domain_avg", "in-domain avg"), ("ood", "OOD"))


def sweep_tables(points: dict[Point, dict], pair_list, methods, ks, ratios) -> dict:
    """{pair label: {method: {column: {(K, ratio): (mean, sd, n)}}}}; missing points are absent."""
    out: dict = {}
    for teacher, student in pair_list:
        label = pair_label(teacher, student, pair_list)
        for method in methods:
            cells = {col: {} for col, _ in COLUMNS}
            for k in ks:
                for ratio in method_ratios(method, ratios):
                    stats = points.get((teacher, student, method, int(k), ratio))
                    for col, _ in COLUMNS:
                        if stats is not None:
                            cells[col][(int(k), ratio)] = stats[col]
            out.setdefault(label, {})[method] = cells
    return out


def markdown(tables: dict, base: dict, ks, ratios, n_seeds: int) -> str:
    parts = [f"# Sweep report\n\nAccuracy (%), mean ± sd over {n_seeds} seed(s). Rows: K; columns: selection "
             "ratio ρ (`all` for methods without a budget).\n"]
    for label, methods in tables.items():
        parts.append(f"\n## {label}\n\nBefore distillation: in-domain {base[label]['in_domain_avg']:.1f}, "
                     f"OOD {base[label]['ood']:.1f}.\n")
        for method, cells in methods.items():
            cols = method_ratios(method, ratios)
            heads = ["all" if c == "1" else f"ρ={c}" for c in cols]
            for col, title in COLUMNS:
                parts.append(f"\n**{method}: {title}**\n\n| K | " + " | ".join(heads) + " |\n|---|"
                             + "---:|" * len(cols) + "\n")
                for k in ks:
                    vals = [cells[col].get((int(k), c)) for c in cols]
                    parts.append(f"| {k} | " + " | ".join("—" if v is None else f"{v[0]:.1f} ± {v[1]:.1f}"
                                                          for v in vals) + " |\n")
    return "".join(parts)


def write_csv(tables: dict, path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pair", "method", "K", "ratio", "metric", "mean", "sd", "n_seeds"])
        for label, methods in tables.items():
            for method, cells in methods.items():
                for col, values in cells.items():
                    for (k, ratio), (m, sd, n) in values.items():
                        w.writerow([label, method, k, ratio, col, round(m, 3), round(sd, 3), n])


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
            grid = [[cells[col].get((int(k), c), (math.nan,))[0] for c in cols] for k in ks]
            # Centre the colour scale on the student before distillation: red = worse, blue = better.
            span = max([abs(v - base[label][col]) for row in grid for v in row if not math.isnan(v)] + [1.0])
            im = ax.imshow(grid, cmap="RdBu", vmin=base[label][col] - span, vmax=base[label][col] + span)
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    dark = not math.isnan(v) and abs(v - base[label][col]) > 0.6 * span  # white on deep colours
                    ax.text(j, i, "—" if math.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
            ax.set_xticks(range(len(cols)), ["all" if c == "1" else c for c in cols], fontsize=7)
            ax.set_yticks(range(len(ks)), [str(k) for k in ks], fontsize=7)
            ax.set_xlabel("ratio ρ", fontsize=7)
            ax.set_ylabel("K", fontsize=7)
            ax.set_title(f"{label} · {method} · {title} (base {base[label][col]:.1f})", fontsize=7)
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="K x ratio tables and heatmaps of an OPD sweep.")
    add_grid_args(p, figure="heatmaps")
    args = p.parse_args(argv)
    from opd.infra import tracking

    runs, metrics = grid_runs(args), parse_metrics(args.metric)
    pair_list = list(dict.fromkeys((r.teacher, r.student) for r in runs))
    points = collect_runs(runs, args.tasks, args.ood_tasks, metrics, args.results)
    ratios = [fmt_ratio(r) for r in args.ratios]
    tables = sweep_tables(points, pair_list, args.methods, args.top_k, args.ratios)
    base = {pair_label(t, s, pair_list): eval_row(args.results / "eval" / s, args.tasks, args.ood_tasks, metrics)
            for t, s in pair_list}
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(markdown(tables, base, args.top_k, args.ratios, len(args.seeds)))
    write_csv(tables, args.out_csv)
    plot(tables, base, args.top_k, ratios, args.out_png)
    with tracking.run(args.study, "report_sweep", params={"top_k": args.top_k, "ratios": args.ratios}) as run:
        run.log_metrics({f"{label}.{method}.K{k}.ratio{ratio}.{col}": v[0]
                         for label, methods in tables.items() for method, cells in methods.items()
                         for col, values in cells.items() for (k, ratio), v in values.items()})
        for path in (args.out_md, args.out_csv, args.out_png):
            run.log_artifact(path)
    print(args.out_md.read_text())


if __name__ == "__main__":
    main()
