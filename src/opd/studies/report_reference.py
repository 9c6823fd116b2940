"""Paper vs ours, cell by cell: each published number (opd.studies.reference) beside our run of the same cell.

Per reference row: our estimate with its interval (opd.studies.stats: training seeds and problems, a
problem counted with its mean over the evaluation seeds), our mean ± std over the evaluation seeds (as the
paper prints it), the paper's mean ± std, the difference (ours − paper, points), whether it is within what
the two spreads allow (|difference| <= 2·√(std_ours² + std_paper²); docs/paper.md) and whether the paper's
mean lies in our interval. `avg` is computed the paper's way: the plain mean of the benchmark means.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

from opd.infra import cli
from opd.infra.lmeval_results import parse_metrics
from opd.studies import eval_seeds, reference
from opd.studies import report_stats as rs
from opd.studies.report_train import GRID_FLAGS, add_grid_args, grid_runs
from opd.studies.stats import Estimate, estimate
from opd.studies.sweep import Run


@dataclass(frozen=True)
class Row:
    """One reference cell and ours (points: estimate, interval, spread over evaluation seeds)."""
    ref: reference.Ref
    ours: Estimate
    spread: eval_seeds.Spread

    @property
    def diff(self) -> float:
        return 100 * self.ours.mean - self.ref.mean

    @property
    def within(self) -> str:
        return reference.within(self.diff, 100 * self.spread.std, self.ref.std)

    @property
    def in_interval(self) -> str:
        return "yes" if 100 * self.ours.lo <= self.ref.mean <= 100 * self.ours.hi else "no"


def row_label(r: reference.Ref) -> str:
    return "base" if r.method == reference.BASE else r.method + ("" if r.ratio == "1" else f" ρ={r.ratio}")


def _evals(refs: list[reference.Ref], runs: list[Run], results: Path) -> list[tuple[str, str, int, Path]]:
    """(pair key, row label, training seed, eval dir) of every evaluation a reference row needs."""
    out = []
    for r in refs:
        pair = f"{r.teacher}:{r.student}"
        if r.method == reference.BASE:
            out.append((pair, row_label(r), 0, results / "eval" / r.student))
            continue
        matched = [run for run in runs if (run.teacher, run.student, run.method, run.ratio)
                   == (r.teacher, r.student, r.method, r.ratio)]
        out.extend((pair, row_label(r), run.seed, results / run.path / "eval") for run in matched)
    return list(dict.fromkeys(out))


def compare(refs: list[reference.Ref], runs: list[Run], tasks: list[str], metrics: dict[str, str], results: Path,
            args: argparse.Namespace) -> list[Row]:
    """Every reference row with our numbers of the same cell."""
    evals = _evals(refs, runs, results)
    loaded = {}
    for pair in dict.fromkeys(p for p, *_ in evals):
        loaded[pair] = rs.load_evals([(label, seed, d) for p, label, seed, d in evals if p == pair], tasks, metrics,
                                     args.eval_seeds)
    out = []
    for r in refs:
        scores, seed_scores = loaded[f"{r.teacher}:{r.student}"]
        column = tasks if r.benchmark == reference.AVG else [r.benchmark]
        label = row_label(r)
        out.append(Row(r, estimate(scores[label], column, args.level, args.n_boot),
                       eval_seeds.spread(seed_scores, label, column)))
    return out


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None or std != std else f"{mean:.2f} ± {std:.2f}"


def markdown(rows: list[Row], n_eval_seeds: int, source: str, level: float) -> str:
    head = (f"# Published numbers beside ours\n\nReference: `{source}`. Ours: estimate [{100 * level:.0f}% interval] "
            f"over training seeds and problems, and mean ± std over {n_eval_seeds} evaluation seed(s); avg = the "
            f"plain mean of the benchmark means (the paper's Avg). Within: |ours − paper| <= "
            f"{reference.Z:g}·√(std_ours² + std_paper²) ('—' where a spread is unknown). Points (%).\n")
    out = [head]
    for table in dict.fromkeys(r.ref.table for r in rows):
        out.append(f"\n## Table {table}\n\n| pair | method | benchmark | ours [CI] | ours mean ± std | paper mean ± std "
                   "| ours − paper | within spreads | paper in our CI | note |\n|---|---|---|---:|---:|---:|---:|---|---|---|\n")
        for row in (r for r in rows if r.ref.table == table):
            r, e = row.ref, row.ours
            out.append(f"| {r.teacher} → {r.student} | {row_label(r)} | {r.benchmark} | {100 * e.mean:.2f} "
                       f"[{100 * e.lo:.2f}, {100 * e.hi:.2f}] | {_pm(100 * row.spread.mean, 100 * row.spread.std)} "
                       f"| {_pm(r.mean, r.std)} | {row.diff:+.2f} | {row.within} | {row.in_interval} | {r.note} |\n")
    return "".join(out)


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["table", "teacher", "student", "method", "ratio", "benchmark", "ours", "ours_lo", "ours_hi",
                    "ours_eval_mean", "ours_eval_std", "eval_seeds", "paper", "paper_std", "diff", "within",
                    "paper_in_ci", "note"])
        for row in rows:
            r, e, s = row.ref, row.ours, row.spread
            w.writerow([r.table, r.teacher, r.student, r.method, r.ratio, r.benchmark,
                        *(round(100 * v, 3) for v in (e.mean, e.lo, e.hi, s.mean, s.std)), s.n, r.mean,
                        "" if r.std is None else r.std, round(row.diff, 3), row.within, row.in_interval, r.note])


def plot(rows: list[Row], path: Path) -> None:
    """Ours against the paper, one point per cell (bars: each side's std over evaluation seeds), y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for i, bench in enumerate(dict.fromkeys(r.ref.benchmark for r in rows)):
        sel = [r for r in rows if r.ref.benchmark == bench]
        ax.errorbar([r.ref.mean for r in sel], [100 * r.ours.mean for r in sel],
                    xerr=[0.0 if r.ref.std is None else r.ref.std for r in sel],
                    yerr=rs.error_bars([r.ours for r in sel]), fmt="o", color=f"C{i}", label=bench, capsize=2)
    ax.plot([0, 100], [0, 100], "k--", linewidth=0.8)
    ax.set_xlabel("paper (%)")
    ax.set_ylabel("ours (%), bars: interval")
    ax.set_title("Published numbers vs ours, one point per cell", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description="Put published numbers (a reference CSV) beside ours, cell by cell.")
    p.add_argument("--reference", type=Path, required=True, help="reference CSV (config evaluation.reference)")
    add_grid_args(p, figure="scatter of ours against the paper")
    return p


def main(argv: list[str] | None = None) -> None:
    args = cli.validate(build_parser().parse_args(argv), GRID_FLAGS)
    if len(args.top_k) != 1:
        raise ValueError(f"--top-k {' '.join(map(str, args.top_k))}: published cells are matched to runs by pair, "
                         "method and ratio, so the grid must hold one K (config train.top_k)")
    runs = grid_runs(args)
    refs = reference.read(args.reference)
    problems = reference.study_problems(refs, args.reference, list(dict.fromkeys((r.teacher, r.student) for r in runs)),
                                        args.methods, args.ratios, args.tasks)
    if problems:
        raise ValueError("\n".join(problems))
    rows = compare(refs, runs, args.tasks, parse_metrics(args.metric), args.results, args)
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(markdown(rows, len(args.eval_seeds), str(args.reference), args.level))
    write_csv(rows, args.out_csv)
    plot(rows, args.out_png)
    from opd.infra import tracking

    with tracking.run(args.study, "report_reference", params={"reference": str(args.reference),
                                                               "eval_seeds": args.eval_seeds}) as run:
        run.log_metrics({f"{r.ref.teacher}.{r.ref.student}.{row_label(r.ref)}.{r.ref.benchmark}.{k}": v
                         for r in rows for k, v in (("ours", 100 * r.ours.mean), ("diff", r.diff))})
        for path in (args.out_md, args.out_csv, args.out_png):
            run.log_artifact(path)
    print(args.out_md.read_text())


if __name__ == "__main__":
    cli.run(main)
