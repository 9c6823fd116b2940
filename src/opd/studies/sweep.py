"""The training grid of a study: which (teacher, student, method, K, ratio, seed) runs exist, and where.

One place decides the run list, so the workflow (which jobs to make) and the reports (which
directories to read) cannot disagree. Paths follow snakemake.utils.Paramspace's `key~value` style:

    <results>/train/<teacher>/<student>/<method>/K~<K>/ratio~<ratio>/seed~<seed>/

(`Run.path` is that path relative to the results root, config `results_dir`.)

With `train.student_builds: per_seed` every training seed s > 0 starts from its own build of the student,
the model `<student>~build<s>` (SFT seed = config `seed` + s; seed 0 keeps the student itself): a replicate
then covers the student's making as well as its distillation (docs/miniature-world.md, docs/statistics.md).

`full` and `release` supervise every (pre-release) position and have no budget, so the ratio grid
does not multiply them: they run once per K with ratio~1 ("all positions eligible").
"""

from __future__ import annotations

from dataclasses import dataclass

RATIO_FREE_METHODS = ("full", "release")


@dataclass(frozen=True)
class Run:
    teacher: str
    student: str
    method: str
    k: int
    ratio: str  # as written in the path, e.g. "0.1"
    seed: int

    @property
    def path(self) -> str:
        """The run's directory relative to the results root."""
        return f"train/{self.teacher}/{self.student}/{self.method}/K~{self.k}/ratio~{self.ratio}/seed~{self.seed}"


def fmt_ratio(ratio: float) -> str:
    """The ratio as a path component: shortest round-trip form ('0.1', '0.05', '1')."""
    return f"{float(ratio):g}"


def pairs(models: dict, train: dict) -> list[tuple[str, str]]:
    """(teacher, student) pairs: `train.pairs` when given, else the one teacher with every student."""
    if train.get("pairs"):
        return [(p["teacher"], p["student"]) for p in train["pairs"]]
    teacher = next(n for n, m in models.items() if m["role"] == "teacher")
    students = train.get("students") or [n for n, m in models.items() if m["role"] == "student"]
    return [(teacher, s) for s in students]


def method_ratios(method: str, ratios: list[float]) -> list[str]:
    return ["1"] if method in RATIO_FREE_METHODS else [fmt_ratio(r) for r in ratios]


def grid(pair_list: list[tuple[str, str]], methods: list[str], ks: list[int], ratios: list[float],
         seeds: list[int]) -> list[Run]:
    """Every run of the grid, in a stable order (pair, method, K, ratio, seed)."""
    out = []
    for teacher, student in pair_list:
        for method in methods:
            for k in ks:
                for ratio in method_ratios(method, ratios):
                    out.extend(Run(teacher, student, method, int(k), ratio, int(s)) for s in seeds)
    return out


def runs(models: dict, train: dict) -> list[Run]:
    """Every training run a study config asks for."""
    return grid(pairs(models, train), train["methods"], train["top_k"], train["ratio"], train["seeds"])


def per_seed_builds(train: dict) -> bool:
    return train.get("student_builds", "shared") == "per_seed"


def student_build(student: str, seed: int, per_seed: bool) -> str:
    """The model a run of `student` with training seed `seed` starts from."""
    return f"{student}~build{seed}" if per_seed and seed else student


def builds(models: dict, train: dict) -> dict[str, tuple[str, int]]:
    """{build model name: (student, seed)} of the extra student builds a per-seed study makes (none when shared)."""
    if not per_seed_builds(train):
        return {}
    students = dict.fromkeys(s for _, s in pairs(models, train))
    return {student_build(st, s, True): (st, s) for st in students for s in train["seeds"] if s}


def pair_label(teacher: str, student: str, pair_list: list[tuple[str, str]]) -> str:
    """The student's name when the study has one teacher, else 'teacher→student'."""
    return student if len({t for t, _ in pair_list}) == 1 else f"{teacher}→{student}"


def is_sweep(train: dict) -> bool:
    """More than one (K, ratio) point: the sweep report (K x ratio tables and heatmaps) is made."""
    return len(train["top_k"]) > 1 or len(train["ratio"]) > 1
