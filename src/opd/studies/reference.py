"""Published numbers as data: a reference table (CSV) read, checked against the study, and set beside ours.

The file (config evaluation.reference; e.g. config/papers/ta_opd_reference.csv) is CSV with `#` comment
lines (its source: arXiv id, table) and the header

    table,teacher,student,method,ratio,benchmark,mean,std,note

one row per published cell, in points (%): `method` is `base` (the student before distillation, empty
ratio) or a method of train.methods; `ratio` its selection ratio (empty or 1 for full/release);
`benchmark` a benchmark of evaluation.benchmarks or `avg` (the paper's Avg: the plain mean of the
benchmark means); `std` may be empty where the paper prints none; `note` is free text (e.g. a stand-in
model). Model names are the study's own (config `models`). A malformed row, or a pair, method, ratio or
benchmark the study does not run, is one error naming file:line.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from opd.studies.benchmarks import project_path
from opd.studies.sweep import RATIO_FREE_METHODS, fmt_ratio, pairs

HEADER = ["table", "teacher", "student", "method", "ratio", "benchmark", "mean", "std", "note"]
AVG = "avg"
BASE = "base"
Z = 2.0  # "within the spreads": |difference| <= Z * sqrt(std_ours² + std_paper²) (docs/paper.md)


@dataclass(frozen=True)
class Ref:
    """One published cell; `mean` and `std` in points, `ratio` as in run paths ('1' for full, '' for base)."""
    line: int
    table: str
    teacher: str
    student: str
    method: str
    ratio: str
    benchmark: str
    mean: float
    std: float | None
    note: str

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return self.teacher, self.student, self.method, self.ratio, self.benchmark


def _number(text: str, what: str, where: str, optional: bool = False) -> float | None:
    if optional and not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {what} {text!r} is not a number") from None
    if not 0.0 <= value <= 100.0 or math.isnan(value):
        raise ValueError(f"{where}: {what} {text!r} is not a percentage in [0, 100]")
    return value


def _ratio(method: str, text: str, where: str) -> str:
    if method == BASE:
        if text.strip():
            raise ValueError(f"{where}: method base has no ratio (got {text!r}); leave it empty")
        return ""
    if method in RATIO_FREE_METHODS:
        if text.strip() not in ("", "1"):
            raise ValueError(f"{where}: method {method} supervises every position: ratio must be empty or 1, "
                             f"got {text!r}")
        return "1"
    try:
        return fmt_ratio(float(text))
    except ValueError:
        raise ValueError(f"{where}: ratio {text!r} of method {method} is not a number") from None


def read(path: Path) -> list[Ref]:
    """The rows of a reference file; a malformed row is a ValueError naming file:line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"reference file not found: {path} (config evaluation.reference)") from None
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise ValueError(f"{path}: no header and no rows (expected {','.join(HEADER)})")
    (head_no, head), *body = numbered
    if next(csv.reader([head])) != HEADER:
        raise ValueError(f"{path}:{head_no}: header must be {','.join(HEADER)}, got {head!r}")
    out, seen = [], {}
    for lineno, line in body:
        where = f"{path}:{lineno}"
        cells = next(csv.reader([line]))
        if len(cells) != len(HEADER):
            raise ValueError(f"{where}: {len(cells)} fields, expected {len(HEADER)} ({','.join(HEADER)})")
        row = dict(zip(HEADER, (c.strip() for c in cells)))
        for key in ("table", "teacher", "student", "method", "benchmark", "mean"):
            if not row[key]:
                raise ValueError(f"{where}: empty {key}")
        ref = Ref(lineno, row["table"], row["teacher"], row["student"], row["method"],
                  _ratio(row["method"], row["ratio"], where), row["benchmark"],
                  _number(row["mean"], "mean", where), _number(row["std"], "std", where, optional=True), row["note"])
        if ref.key in seen:
            raise ValueError(f"{where}: the same cell as line {seen[ref.key]} ({', '.join(ref.key[:4])}, "
                             f"{ref.benchmark})")
        seen[ref.key] = lineno
        out.append(ref)
    return out


def study_problems(refs: list[Ref], path: Path, pair_list: list[tuple[str, str]], methods: list[str],
                   ratios: list[float], benchmarks: list[str]) -> list[str]:
    """One line (file:line) per row naming a pair, method, ratio or benchmark the study does not run."""
    allowed_ratios = {fmt_ratio(r) for r in ratios}
    problems = []
    for r in refs:
        where = f"{path}:{r.line}"
        if (r.teacher, r.student) not in pair_list:
            problems.append(f"{where}: pair {r.teacher} -> {r.student} is not a pair of the study "
                            f"({', '.join(f'{t} -> {s}' for t, s in pair_list)})")
        elif r.method != BASE and r.method not in methods:
            problems.append(f"{where}: method {r.method!r} is not in train.methods ({', '.join(methods)}) nor 'base'")
        elif r.method not in (BASE, *RATIO_FREE_METHODS) and r.ratio not in allowed_ratios:
            problems.append(f"{where}: ratio {r.ratio} is not in train.ratio ({', '.join(sorted(allowed_ratios))})")
        elif r.benchmark != AVG and r.benchmark not in benchmarks:
            problems.append(f"{where}: benchmark {r.benchmark!r} is not in evaluation.benchmarks "
                            f"({', '.join(benchmarks)}) nor {AVG!r}")
    return problems


def config_problems(config: dict, root: Path | None = None) -> list[str]:
    """Validation check: evaluation.reference readable, every row one the study runs, one train.top_k."""
    name = config["evaluation"].get("reference")
    if not name:
        return []
    path = Path(root) / name if root is not None and not Path(name).is_absolute() else project_path(name)
    train = config["train"]
    if len(train["top_k"]) != 1:
        return [f"evaluation.reference: the published cells are matched to runs by pair, method and ratio, so "
                f"train.top_k must hold one K (got {train['top_k']})"]
    try:
        refs = read(path)
    except (OSError, ValueError) as err:
        return [f"evaluation.reference: {err}"]
    return [f"evaluation.reference: {p}" for p in study_problems(
        refs, path, pairs(config["models"], train), train["methods"], train["ratio"],
        config["evaluation"]["benchmarks"])]


def within(diff: float, std_ours: float, std_ref: float | None) -> str:
    """'yes' / 'no': |diff| within Z·√(std_ours² + std_ref²); '—' when either spread is unknown."""
    if std_ref is None or std_ours is None or math.isnan(std_ours):
        return "—"
    return "yes" if abs(diff) <= Z * math.sqrt(std_ours ** 2 + std_ref ** 2) + 1e-9 else "no"
