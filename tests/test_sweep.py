"""The training grid (opd.studies.sweep) and the sweep report (opd.studies.report_sweep), with numbers worked out by hand."""

import argparse

import pytest

from opd.infra.lmeval_results import parse_metrics
from opd.studies import report_stats, report_sweep, report_train, sweep
from opd.studies.report_train import is_several, pair_scores
from conftest import write_eval

MODELS = {"t": {"role": "teacher"}, "a": {"role": "student"}, "b": {"role": "student"}}


def test_grid_counts_and_paths():
    train = {"methods": ["full", "ta_opd"], "top_k": [8, 16], "ratio": [0.05, 0.1, 0.3], "seeds": [0, 1],
             "students": ["a"]}
    runs = sweep.runs(MODELS, train)
    # full: 2 K x 1 (no ratio) x 2 seeds = 4; ta_opd: 2 K x 3 ratios x 2 seeds = 12
    assert len(runs) == 16
    assert runs[0].path == "train/t/a/full/K~8/ratio~1/seed~0"
    assert runs[-1].path == "train/t/a/ta_opd/K~16/ratio~0.3/seed~1"
    assert sweep.is_sweep(train)
    assert not sweep.is_sweep({**train, "top_k": [8], "ratio": [0.1]})


def test_default_pairs_and_explicit_pairs():
    assert sweep.pairs(MODELS, {}) == [("t", "a"), ("t", "b")]
    assert sweep.pairs(MODELS, {"pairs": [{"teacher": "a", "student": "b"}]}) == [("a", "b")]
    pair_list = [("t", "a"), ("a", "b")]
    assert sweep.pair_label("a", "b", pair_list) == "a→b"
    assert sweep.pair_label("t", "a", [("t", "a"), ("t", "b")]) == "a"


def test_ratio_path_form():
    assert [sweep.fmt_ratio(r) for r in (0.1, 0.05, 1, 1.0, 0.3)] == ["0.1", "0.05", "1", "1", "0.3"]


def first(n, total=100):
    """Outcomes with the first n problems right: nested sets, so paired differences are exact."""
    return [1] * n + [0] * (total - n)


def stats_args():
    return argparse.Namespace(level=0.95, n_boot=2000, eval_seeds=[0], student_builds="shared")


def test_sweep_table_by_hand(tmp_path):
    runs = sweep.grid([("t", "a")], ["ta_opd"], [8], [0.1, 0.3], [0, 1])
    # in-domain = arith1 only; OOD = reverse; 100 problems each. Seeds 0/1 at rho=0.1: 40% and 60% -> 50
    values = {("0.1", 0): (40, 100), ("0.1", 1): (60, 100), ("0.3", 0): (20, 50), ("0.3", 1): (20, 70)}
    for r in runs:
        ind, ood = values[(r.ratio, r.seed)]
        write_eval(tmp_path / "results" / r.path / "eval", {"arith1": first(ind), "reverse": first(ood)})
    write_eval(tmp_path / "results/eval/a", {"arith1": first(30), "reverse": first(90)})
    results, tasks = tmp_path / "results", ["arith1", "reverse"]
    columns = report_stats.columns_of(tasks, ["reverse"])
    scores = pair_scores(runs, tasks, {}, results, several=True)
    tables, base, comps = report_sweep.analyse(runs, scores, columns, stats_args())
    e, v = tables["a"]["ta_opd"]["in_domain_avg"][(8, "0.1")]
    assert (e.mean, e.n_seeds, e.n_problems, v) == (pytest.approx(0.50), 2, 100, "better")
    assert tables["a"]["ta_opd"]["ood"][(8, "0.3")][0].mean == pytest.approx(0.60)
    # 20% vs 30% on the same problems: 10 discordant of 100, paired SE 0.03 -> worse; OOD at rho=0.3 too
    assert tables["a"]["ta_opd"]["in_domain_avg"][(8, "0.3")][1] == "worse"
    assert [c.verdict for c in comps["a"]] == ["better", "better", "worse", "worse"]  # Holm over these 4
    md = report_sweep.markdown(tables, base, comps, [8], [0.1, 0.3], 2, stats_args())
    assert f"Before distillation: in-domain avg {report_stats.cell(base['a']['in_domain_avg'])}, OOD" in md
    assert f"| 8 | {report_stats.cell(e)} ▲ | {report_stats.cell(tables['a']['ta_opd']['in_domain_avg'][(8, '0.3')][0])} ▼ |" in md
    assert "±" not in md
    training = pair_scores(runs, tasks, {}, results, several=is_several(runs))
    assert set(training["a"]) == {"base", "ta_opd K=8 ρ=0.1", "ta_opd K=8 ρ=0.3"}
    report_sweep.plot(tables, base, [8], ["0.1", "0.3"], tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_training_report_verdicts_vs_full_and_base(tmp_path):
    runs = sweep.grid([("t", "a")], ["full", "ta_opd"], [8], [0.1], [0])
    outcomes = {"full": (40, 60), "ta_opd": (40, 30)}
    for r in runs:
        ind, ood = outcomes[r.method]
        write_eval(tmp_path / "results" / r.path / "eval", {"arith1": first(ind, 500), "reverse": first(ood, 500)})
    write_eval(tmp_path / "results/eval/a", {"arith1": first(30, 500), "reverse": first(60, 500)})
    tasks = ["arith1", "reverse"]
    ests, comps, scores, _ = report_train.analyse(runs, tasks, ["reverse"], {}, tmp_path / "results", stats_args())
    got = {(c.a, c.b, c.column): c.verdict for c in comps["a"]}
    assert got == {("ta_opd", "full", "in_domain_avg"): "n.d.", ("ta_opd", "full", "ood"): "worse",
                   ("ta_opd", "base", "in_domain_avg"): "better", ("ta_opd", "base", "ood"): "worse",
                   ("full", "base", "in_domain_avg"): "better", ("full", "base", "ood"): "n.d."}
    md = report_train.markdown(ests, comps, scores, list(report_stats.columns_of(tasks, ["reverse"])), ["arith1"], 1,
                               stats_args())
    assert "| ta_opd | " in md and "| n.d. / worse | better / worse |" in md
    assert "| full | " in md and "| — | better / n.d. |" in md
    assert "**Power**" in md and "Not paired" not in md
    report_train.plot(ests, tmp_path / "t.png", 0.95)
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_training_report_names_runs_it_cannot_pair(tmp_path):
    runs = sweep.grid([("t", "a")], ["full"], [8], [0.1], [0])
    write_eval(tmp_path / "results" / runs[0].path / "eval", {"arith1": first(40), "reverse": first(50)})
    # the base was evaluated on other problems (doc ids 100-199): pairing them would pair wrong problems
    write_eval(tmp_path / "results/eval/a", {"arith1": first(30), "reverse": first(50)}, offset=100)
    ests, comps, scores, _ = report_train.analyse(runs, ["arith1", "reverse"], ["reverse"], {}, tmp_path / "results",
                                               stats_args())
    assert all(not c.paired for c in comps["a"])
    md = report_train.markdown(ests, comps, scores, ["arith1", "reverse", "in_domain_avg", "ood"], ["arith1"], 1,
                               stats_args())
    assert "**Not paired** (arith1: " in md and str(tmp_path / "results/eval/a") in md
    assert str(tmp_path / "results" / runs[0].path / "eval") in md and "(unpaired)" in md


def test_metric_flags():
    assert parse_metrics(["ifeval=prompt_level_strict_acc,none"]) == {"ifeval": "prompt_level_strict_acc,none"}
    with pytest.raises(ValueError, match="TASK=METRIC"):
        parse_metrics(["ifeval"])


def test_training_report_main_logs_intervals_and_comparisons_to_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    runs = sweep.grid([("t", "a")], ["full", "ta_opd"], [8], [0.1], [0])
    for r in runs:
        write_eval(tmp_path / "results" / r.path / "eval", {"arith1": first(40), "reverse": first(50)})
    write_eval(tmp_path / "results/eval/a", {"arith1": first(30), "reverse": first(50)})
    out = tmp_path / "report"
    report_train.main(["--pairs", "t:a", "--methods", "full", "ta_opd", "--top-k", "8", "--ratios", "0.1",
                       "--seeds", "0", "--tasks", "arith1", "reverse", "--ood-tasks", "reverse",
                       "--results", str(tmp_path / "results"), "--study", "s", "--n-boot", "500",
                       "--out-md", str(out / "t.md"), "--out-csv", str(out / "t.csv"), "--out-png", str(out / "t.png"),
                       "--out-comparisons", str(out / "c.csv")])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    m = run.data.metrics
    assert m["a.full.in_domain_avg.mean"] == pytest.approx(40.0) and m["a.full.in_domain_avg.lo"] < 40.0
    # identical evaluations: the paired difference is 0 on every replicate
    assert (m["a.ta_opd_vs_full.in_domain_avg.diff"], m["a.ta_opd_vs_full.in_domain_avg.p"]) == (0.0, 1.0)
    assert m["a.full_vs_base.in_domain_avg.diff"] == pytest.approx(10.0) and m["a.full_vs_base.ood.paired"] == 1.0
    assert run.data.params["n_boot"] == "500"
    assert "full − base | in_domain_avg | +10.0" in (out / "t.md").read_text()


def test_student_builds_per_seed():
    train = {"methods": ["full"], "top_k": [8], "ratio": [0.1], "seeds": [0, 2], "students": ["a"]}
    assert sweep.builds(MODELS, train) == {}  # shared: every seed starts from `a`
    per_seed = {**train, "student_builds": "per_seed"}
    assert sweep.builds(MODELS, per_seed) == {"a~build2": ("a", 2)}  # seed 0 keeps the student itself
    assert [sweep.student_build("a", s, True) for s in (0, 2)] == ["a", "a~build2"]
    assert sweep.student_build("a", 2, False) == "a"


def test_training_report_per_seed_builds_pairs_on_seeds(tmp_path):
    # Two builds of student a: build 0 scores 10%, build 1 (results/eval/a~build1) 50%; full gains 20 points on
    # each (30% / 70%, nested sets: the same 20 problems flip). Paired on builds, full − base is +0.20 with
    # only problem noise (20 discordant problems of 100 per build): better. The base row has both builds.
    runs = sweep.grid([("t", "a")], ["full"], [8], [0.1], [0, 1])
    for r, n in zip(runs, (30, 70)):
        write_eval(tmp_path / "results" / r.path / "eval", {"arith1": first(n), "reverse": first(50)})
    write_eval(tmp_path / "results/eval/a", {"arith1": first(10), "reverse": first(50)})
    write_eval(tmp_path / "results/eval/a~build1", {"arith1": first(50), "reverse": first(50)})
    args = argparse.Namespace(**{**vars(stats_args()), "student_builds": "per_seed"})
    ests, comps, scores, _ = report_train.analyse(runs, ["arith1", "reverse"], ["reverse"], {}, tmp_path / "results",
                                               args)
    assert scores["a"]["base"].seeds == [0, 1] and ests["a"]["base"]["in_domain_avg"].mean == pytest.approx(0.30)
    c = next(c for c in comps["a"] if c.column == "in_domain_avg")
    assert (c.diff, c.paired, c.verdict) == (pytest.approx(0.20), True, "better")
    # paired on builds the interval is problem noise alone: 20 of 100 flipped per build, SE ~ 0.04 / sqrt(2)
    assert 0.12 < c.lo < 0.16 and 0.24 < c.hi < 0.28
    md = report_train.markdown(ests, comps, scores, ["arith1", "reverse", "in_domain_avg", "ood"], ["arith1"], 2, args)
    assert "Each seed is its own build of the student" in md
