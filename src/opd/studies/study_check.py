"""Does the study's conclusion depend on the CPU's float kernels? Rerun it under several, compare.

    python -m opd.studies.study_check --configfiles config/config.yaml config/study_check.yaml

For each kernel setting (`ATEN_CPU_CAPABILITY=default`, `avx2`, and the machine's own, `native`) it runs
Snakemake over the config(s) into `<out-root>/<setting>/` (every model is rebuilt there: data, tokenizer,
SFT, evaluation, distillation, reports), then compares the settings' reports:

- every base model (with `train.student_builds: per_seed`, every student build too) must score the same under
  every setting up to problem sampling: the model built under one setting against the one built under
  another, paired on the same problems, on each benchmark and the in-domain / OOD averages, Holm-corrected
  over all of these (`opd.studies.stats`), must be "n.d.";
- every comparison of the training report (`training_comparisons.csv`: method − base, method − `full`, ...)
  must reach the same verdict ("better" / "worse" / "n.d.") under every setting.

It prints one table per check and a last line `study-check: AGREE` (exit 0) or `study-check: DISAGREE`
(exit 1): every verdict the same. Before it, `study-check estimates: CONSISTENT` / `INCONSISTENT` says the
weaker thing that replication can promise near the resolution limit: no base model differs, no two settings'
estimates of a comparison are resolved apart (Holm) and no verdicts are opposite (`consistency`).
`--compare-only` compares directories that exist already. The CPU time (user + sys of each Snakemake process
tree) is printed per setting. CI does not run it (three studies); docs/miniature-world.md quotes its output.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import NormalDist

from opd.infra.config import validate_config
from opd.studies import report_stats, stats, sweep
from opd.studies.validate import load

SETTINGS = ("default", "avx2", "native")  # native: ATEN_CPU_CAPABILITY unset, the best the CPU has


def run_setting(setting: str, configfiles: list[Path], out: Path, cores: int) -> dict[str, float]:
    """Snakemake over the configs into `out`, under one kernel setting; wall and CPU seconds."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if setting != "native":
        env["ATEN_CPU_CAPABILITY"] = setting
    cmd = [sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/default", "--cores", str(cores),
           "--configfile", *map(str, configfiles), "--config", f"results_dir={out}"]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "study_check.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        sys.exit(f"study-check: snakemake failed under {setting} (exit {rc}); see {out / 'study_check.log'}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": time.time() - start, "cpu_s": cpu}


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        sys.exit(f"study-check: {path} is missing; run without --compare-only first")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def score_table(tables: dict[str, list[dict]]) -> list[str]:
    """Every base model's score [95% interval] under each setting (`models.csv`), for reading."""
    settings = list(tables)
    columns = [c for c in tables[settings[0]][0] if c != "model" and not c.endswith(("_lo", "_hi"))]
    rows = {s: {r["model"]: r for r in t} for s, t in tables.items()}
    lines = [f"| model | column | {' | '.join(settings)} |", "|---|---|" + "---:|" * len(settings)]
    for model in rows[settings[0]]:
        for col in columns:
            cells = [rows[s].get(model) for s in settings]
            lines.append(f"| {model} | {col} | " + " | ".join(
                f"{float(c[col]):.1f} [{float(c[col + '_lo']):.1f}, {float(c[col + '_hi']):.1f}]" if c else "—"
                for c in cells) + " |")
    return lines


def base_disagreements(out_root: Path, settings: list[str], config: dict) -> tuple[list[str], list[str]]:
    """(lines, problems): each base model under one setting against itself under another, paired on the same
    problems, every benchmark and the in-domain/OOD averages, Holm over all of them (opd.studies.stats). A
    difference the problems resolve ("better"/"worse") is a disagreement; "n.d." means the two models differ
    by no more than problem sampling can hide."""
    e = config["evaluation"]
    models = e.get("models") or [*config["models"], *sweep.builds(config["models"], config["train"])]
    evals = [(f"{m}@{s}", 0, out_root / s / "eval" / m) for m in models for s in settings]
    scores = report_stats.load_scores(evals, e["benchmarks"], e.get("metrics") or {})
    pairs = [(f"{m}@{a}", f"{m}@{b}") for m in models for a, b in itertools.combinations(settings, 2)]
    comps = stats.compare_all(scores, report_stats.columns_of(e["benchmarks"], e["ood_benchmarks"]), pairs)
    lines = ["| model | settings | column | difference [95% CI] | Holm p | verdict |", "|---|---|---|---:|---:|---|"]
    problems = []
    for c in comps:
        model, a = c.a.split("@")
        b = c.b.split("@")[1]
        lines.append(f"| {model} | {a} − {b} | {c.column} | {100 * c.diff:+.1f} [{100 * c.lo:+.1f}, "
                     f"{100 * c.hi:+.1f}] | {c.p_holm:.3f} | {c.verdict} |")
        if c.verdict != "n.d.":
            problems.append(f"{model} {c.column}: {a} − {b} = {100 * c.diff:+.1f} points, {c.verdict} "
                            f"(Holm p {c.p_holm:.3f})")
    return lines, problems


def _by_comparison(tables: dict[str, list[dict]]) -> dict[str, dict[tuple, dict]]:
    """{setting: {(table, a, b, metric): row}} of each setting's training_comparisons.csv rows."""
    return {st: {(r["table"], r["a"], r["b"], r["metric"]): r for r in t} for st, t in tables.items()}


def verdict_disagreements(tables: dict[str, list[dict]]) -> tuple[list[str], list[str]]:
    """(lines of the verdict table, problems): a comparison whose verdict differs between settings."""
    settings, rows = list(tables), _by_comparison(tables)
    lines = [f"| student | comparison | metric | {' | '.join(settings)} |", "|---|---|---|" + "---:|" * len(settings)]
    problems = []
    for k in rows[settings[0]]:
        cells = {s: rows[s].get(k) for s in settings}
        if any(c is None for c in cells.values()):
            problems.append(f"{k}: missing under {[s for s, c in cells.items() if c is None]}")
            continue
        lines.append(f"| {k[0]} | {k[1]} − {k[2]} | {k[3]} | " + " | ".join(
            f"{float(c['diff']):+.1f} {c['verdict']}" for c in cells.values()) + " |")
        if len({c["verdict"] for c in cells.values()}) > 1:
            problems.append(f"{k[0]}: {k[1]} − {k[2]} ({k[3]}): " +
                            ", ".join(f"{s} {c['verdict']}" for s, c in cells.items()))
    return lines, problems


def _se(row: dict) -> float:
    """A comparison's standard error from its 95% interval (half-width / 1.96; the report's own p uses the
    bootstrap SE, and the percentile interval of a normal-ish bootstrap is ~ ±1.96 of it)."""
    return (float(row["hi"]) - float(row["lo"])) / (2 * NormalDist().inv_cdf(0.975))


def consistency(tables: dict[str, list[dict]]) -> tuple[list[str], list[str]]:
    """(lines, problems): is each comparison's *estimate* the same under every pair of settings?

    A verdict can differ between two replications whose estimates agree: a difference near what the study can
    resolve is "better" in one and "n.d." in the other (the difference between significant and not
    significant is not itself significant). So each pair of settings' differences is tested against each
    other, z = (d_a − d_b) / sqrt(se_a² + se_b²), Holm over all; a resolved gap, or opposite verdicts
    ("better" vs "worse"), is a machine dependence. Lines: the comparisons whose verdicts differ."""
    settings, rows = list(tables), _by_comparison(tables)
    tests = []
    for k in rows[settings[0]]:
        for a, b in itertools.combinations(settings, 2):
            ra, rb = rows[a].get(k), rows[b].get(k)
            if ra and rb:
                se = math.hypot(_se(ra), _se(rb))
                gap = float(ra["diff"]) - float(rb["diff"])
                p = (1.0 if abs(gap) < 1e-9 else 0.0) if se < 1e-12 else 2 * (1 - NormalDist().cdf(abs(gap) / se))
                tests.append((k, a, b, ra, rb, gap, p))
    lines = ["| student | comparison | metric | settings | difference of differences | Holm p | verdicts |",
             "|---|---|---|---|---:|---:|---|"]
    problems = []
    for (k, a, b, ra, rb, gap, _), p_holm in zip(tests, stats.holm([t[-1] for t in tests])):
        opposite = {ra["verdict"], rb["verdict"]} == {"better", "worse"}
        if ra["verdict"] != rb["verdict"]:
            lines.append(f"| {k[0]} | {k[1]} − {k[2]} | {k[3]} | {a} − {b} | {gap:+.1f} | {p_holm:.3f} | "
                         f"{ra['verdict']} / {rb['verdict']} |")
        if p_holm < 1 - stats.LEVEL or opposite:
            problems.append(f"{k[0]}: {k[1]} − {k[2]} ({k[3]}): {a} {float(ra['diff']):+.1f} vs {b} "
                            f"{float(rb['diff']):+.1f} ({'opposite verdicts' if opposite else f'Holm p {p_holm:.3f}'})")
    return lines, problems


def compare(out_root: Path, settings: list[str], config: dict) -> list[str]:
    """Print the tables; return every disagreement."""
    report = Path("report") / config["study"]
    models = {s: read_csv(out_root / s / report / "models.csv") for s in settings}
    print("\nBase models (score [95% interval], %):\n" + "\n".join(score_table(models)))
    lines, problems = base_disagreements(out_root, settings, config)
    print("\nBase models, setting against setting (paired on problems, Holm):\n" + "\n".join(lines))
    training = {s: read_csv(out_root / s / report / "training_comparisons.csv") for s in settings}
    lines, found = verdict_disagreements(training)
    print("\nTraining comparisons (difference, verdict):\n" + "\n".join(lines))
    lines, gaps = consistency(training)
    print("\nWhere verdicts differ, are the estimates different? (difference of the settings' differences, "
          "Holm over every comparison and pair of settings):\n" + "\n".join(lines))
    for g in gaps:
        print(f"INCONSISTENT: {g}")
    print(f"study-check estimates: {'INCONSISTENT' if gaps or problems else 'CONSISTENT'} (base models "
          f"{'differ' if problems else 'agree'}; {len(gaps)} training comparison(s) resolved apart or opposite)")
    return problems + found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rerun the study under several CPU kernel settings and "
                                                 "check that base scores and verdicts agree.")
    parser.add_argument("--configfiles", type=Path, nargs="+", default=[Path("config/config.yaml")],
                        help="study config(s), merged in order as snakemake --configfile does")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                        help="ATEN_CPU_CAPABILITY values to run (native: unset)")
    parser.add_argument("--out-root", type=Path, default=Path("results/check"),
                        help="one results directory per setting under this folder")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores per setting (settings run in turn)")
    parser.add_argument("--compare-only", action="store_true", help="compare existing results, run nothing")
    args = parser.parse_args(argv)
    if len(args.settings) < 2:
        parser.error("--settings: name at least two settings to compare")
    config = validate_config(load(args.configfiles))
    if not args.compare_only:
        for setting in args.settings:
            t = run_setting(setting, args.configfiles, args.out_root.resolve() / setting, args.cores)
            print(f"{setting}: {t['wall_s'] / 60:.1f} min wall, {t['cpu_s'] / 60:.1f} min CPU (user + sys)",
                  flush=True)
    problems = compare(args.out_root, args.settings, config)
    for p in problems:
        print(f"DISAGREE: {p}")
    print(f"\nstudy-check: {'DISAGREE' if problems else 'AGREE'} ({', '.join(args.settings)}; {args.out_root})")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
