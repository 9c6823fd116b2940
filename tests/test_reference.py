"""Published numbers as data (opd.studies.reference) and the paper-vs-ours report (opd.studies.report_reference):
bad rows named by file:line, rows the study does not run refused, the comparison worked out by hand."""

import csv

import pytest

from opd.infra.lmeval_results import eval_seed_dir
from opd.studies import reference, report_reference
from opd.studies.sweep import Run
from conftest import write_eval

HEAD = "table,teacher,student,method,ratio,benchmark,mean,std,note\n"


def _file(tmp_path, body: str, head: str = HEAD):
    path = tmp_path / "ref.csv"
    path.write_text("# source: a test\n" + head + body)
    return path


def test_read_rows(tmp_path):
    path = _file(tmp_path, "3,t,s,base,,a,40.77,1.5,\n3,t,s,full,,avg,42.37,,\n3,t,s,ta_opd,0.10,a,44.9,0,stand-in\n")
    refs = reference.read(path)
    assert [(r.line, r.method, r.ratio, r.benchmark, r.mean, r.std, r.note) for r in refs] == [
        (3, "base", "", "a", 40.77, 1.5, ""), (4, "full", "1", "avg", 42.37, None, ""),
        (5, "ta_opd", "0.1", "a", 44.9, 0.0, "stand-in")]


@pytest.mark.parametrize("body, message", [
    ("3,t,s,base,,a,40.77\n", r"ref.csv:3: 7 fields, expected 9"),
    ("3,t,s,base,,a,forty,1,\n", r"ref.csv:3: mean 'forty' is not a number"),
    ("3,t,s,base,,a,140,1,\n", r"ref.csv:3: mean '140' is not a percentage in \[0, 100\]"),
    ("3,t,s,base,,a,40,-1,\n", r"ref.csv:3: std '-1' is not a percentage"),
    ("3,t,s,base,0.1,a,40,1,\n", r"ref.csv:3: method base has no ratio"),
    ("3,t,s,full,0.1,a,40,1,\n", r"ref.csv:3: method full supervises every position"),
    ("3,t,s,ta_opd,,a,40,1,\n", r"ref.csv:3: ratio '' of method ta_opd is not a number"),
    ("3,,s,base,,a,40,1,\n", r"ref.csv:3: empty teacher"),
    ("3,t,s,base,,a,40,1,\n4,t,s,base,,a,41,1,\n", r"ref.csv:4: the same cell as line 3"),
])
def test_malformed_rows_named_by_line(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        reference.read(_file(tmp_path, body))


def test_bad_header_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"ref.csv:2: header must be table,teacher"):
        reference.read(_file(tmp_path, "", head="pair,method,mean\n"))
    with pytest.raises(FileNotFoundError, match="evaluation.reference"):
        reference.read(tmp_path / "nope.csv")


def test_rows_the_study_does_not_run(tmp_path):
    path = _file(tmp_path, "3,t,s,base,,a,40,1,\n3,x,s,base,,a,40,1,\n3,t,s,kl,0.1,a,40,1,\n"
                           "3,t,s,ta_opd,0.3,a,40,1,\n3,t,s,ta_opd,0.1,humaneval,40,1,\n3,t,s,ta_opd,0.1,avg,40,,\n")
    problems = reference.study_problems(reference.read(path), path, [("t", "s")], ["full", "ta_opd"], [0.1], ["a", "b"])
    assert problems == [f"{path}:4: pair x -> s is not a pair of the study (t -> s)",
                        f"{path}:5: method 'kl' is not in train.methods (full, ta_opd) nor 'base'",
                        f"{path}:6: ratio 0.3 is not in train.ratio (0.1)",
                        f"{path}:7: benchmark 'humaneval' is not in evaluation.benchmarks (a, b) nor 'avg'"]


def test_config_check(tmp_path, repo):
    from opd.infra.config import load_yaml

    config = load_yaml(repo / "config/config.yaml")
    config.setdefault("evaluation", {})["reference"] = "ref.csv"
    _file(tmp_path, "3,teacher,student_s,base,,nope,40,1,\n")
    assert reference.config_problems(config, tmp_path) == [
        f"evaluation.reference: {tmp_path / 'ref.csv'}:3: benchmark 'nope' is not in evaluation.benchmarks "
        f"({', '.join(config['evaluation']['benchmarks'])}) nor 'avg'"]
    config["train"]["top_k"] = [8, 16]
    assert "train.top_k must hold one K" in reference.config_problems(config, tmp_path)[0]


def test_within_the_spreads():
    # |d| <= 2·sqrt(s1² + s2²): 3 and 4 -> 10
    assert reference.within(10.0, 3.0, 4.0) == "yes" and reference.within(-10.01, 3.0, 4.0) == "no"
    assert reference.within(1.0, 3.0, None) == "—" and reference.within(1.0, float("nan"), 1.0) == "—"


def test_report_cell_by_cell(tmp_path, monkeypatch):
    """Student s before OPD and ta_opd at 0.1 (one training seed), two evaluation seeds, two benchmarks."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    res = tmp_path / "results"
    base, run = res / "eval" / "s", Run("t", "s", "ta_opd", 16, "0.1", 0)
    for d, (a0, a1, b0, b1) in [(base, (4, 6, 2, 2)), (res / run.path / "eval", (6, 8, 5, 3))]:
        write_eval(eval_seed_dir(d, 0), {"a": [1] * a0 + [0] * (10 - a0), "b": [1] * b0 + [0] * (10 - b0)})
        write_eval(eval_seed_dir(d, 1), {"a": [1] * a1 + [0] * (10 - a1), "b": [1] * b1 + [0] * (10 - b1)})
    ref = _file(tmp_path, "3,t,s,base,,a,50,1,\n3,t,s,ta_opd,0.1,avg,40,,stand-in teacher\n"
                          "3,t,s,ta_opd,0.1,b,60,1,\n")
    out = tmp_path / "report"
    report_reference.main(["--pairs", "t:s", "--methods", "ta_opd", "--top-k", "16", "--ratios", "0.1", "--seeds", "0",
                           "--tasks", "a", "b", "--ood-tasks", "--results", str(res), "--eval-seeds", "0", "1",
                           "--reference", str(ref), "--out-md", str(out / "r.md"), "--out-csv", str(out / "r.csv"),
                           "--out-png", str(out / "r.png"), "--study", "t"])
    rows = {(r["method"], r["benchmark"]): r for r in csv.DictReader((out / "r.csv").open())}
    # base on a: seeds 40 and 60 -> 50 ± 14.14; paper 50 ± 1: difference 0, within.
    r = rows[("base", "a")]
    assert (float(r["ours"]), float(r["ours_eval_mean"]), float(r["ours_eval_std"])) == (50.0, 50.0, 14.142)
    assert (float(r["diff"]), r["within"], r["paper_in_ci"]) == (0.0, "yes", "yes")
    # ta_opd avg the paper's way: seed 0 (60 + 50) / 2 = 55, seed 1 (80 + 30) / 2 = 55 -> 55 ± 0; paper 40 (no std).
    r = rows[("ta_opd", "avg")]
    assert (float(r["ours"]), float(r["ours_eval_std"]), float(r["diff"]), r["within"]) == (55.0, 0.0, 15.0, "—")
    assert r["note"] == "stand-in teacher"
    # ta_opd on b: 50 and 30 -> 40 ± 14.14 vs 60 ± 1: -20, 2·sqrt(14.14² + 1) = 28.4 -> within.
    r = rows[("ta_opd", "b")]
    assert (float(r["diff"]), r["within"]) == (-20.0, "yes")
    md = (out / "r.md").read_text()
    assert "| t → s | ta_opd ρ=0.1 | avg | 55.00 [" in md and "| 40.00 | +15.00 | — |" in md
    assert (out / "r.png").stat().st_size > 1000


def test_report_refuses_rows_outside_the_grid(tmp_path):
    ref = _file(tmp_path, "3,t,s,kl,0.1,a,50,1,\n")
    with pytest.raises(ValueError, match=r"ref.csv:3: method 'kl' is not in train.methods"):
        report_reference.main(["--pairs", "t:s", "--methods", "ta_opd", "--top-k", "16", "--ratios", "0.1",
                               "--seeds", "0", "--tasks", "a", "--ood-tasks", "--reference", str(ref),
                               "--out-md", "x.md", "--out-csv", "x.csv", "--out-png", "x.png"])
