"""The training grid (opd.studies.sweep) and the sweep report (opd.studies.report_sweep), with numbers worked out by hand."""

import json

import pytest

from opd.studies import report_sweep
from opd.studies import sweep
from opd.studies.report import parse_metrics
from opd.studies.report_train import collect

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


def _result(tmp_path, d, scores):
    for task, acc in scores.items():
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        (tmp_path / d / f"{task}.json").write_text(
            json.dumps({"results": {task: {"exact_match,strict-match": acc}}}))


def test_sweep_table_by_hand(tmp_path):
    runs = sweep.grid([("t", "a")], ["ta_opd"], [8], [0.1, 0.3], [0, 1])
    # in-domain = arith1 only; OOD = reverse. Seeds 0/1 at rho=0.1: 40% and 60% -> 50 ± 14.14
    values = {("0.1", 0): (0.4, 1.0), ("0.1", 1): (0.6, 1.0), ("0.3", 0): (0.2, 0.5), ("0.3", 1): (0.2, 0.7)}
    for r in runs:
        ind, ood = values[(r.ratio, r.seed)]
        _result(tmp_path, "results/" + r.path + "/eval", {"arith1": ind, "reverse": ood})
    _result(tmp_path, "results/eval/a", {"arith1": 0.3, "reverse": 0.9})
    results = tmp_path / "results"
    points = report_sweep.collect_runs(runs, ["arith1", "reverse"], ["reverse"], {}, results)
    cell = points[("t", "a", "ta_opd", 8, "0.1")]
    assert cell["in_domain_avg"][0] == pytest.approx(50.0)
    assert cell["in_domain_avg"][1] == pytest.approx(14.1421, abs=1e-3)
    assert points[("t", "a", "ta_opd", 8, "0.3")]["ood"][0] == pytest.approx(60.0)
    tables = report_sweep.sweep_tables(points, [("t", "a")], ["ta_opd"], [8], [0.1, 0.3])
    base = {"a": report_sweep.eval_row(results / "eval" / "a", ["arith1", "reverse"], ["reverse"], {})}
    md = report_sweep.markdown(tables, base, [8], [0.1, 0.3], 2)
    assert "Before distillation: in-domain 30.0, OOD 90.0." in md
    assert "| 8 | 50.0 ± 14.1 | 20.0 ± 0.0 |" in md
    assert "| 8 | 100.0 ± 0.0 | 60.0 ± 14.1 |" in md
    training = collect(runs, ["arith1", "reverse"], ["reverse"], {}, results)
    assert set(training["a"]) == {"base", "ta_opd K=8 ρ=0.1", "ta_opd K=8 ρ=0.3"}
    report_sweep.plot(tables, base, [8], ["0.1", "0.3"], tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_metric_flags():
    assert parse_metrics(["ifeval=prompt_level_strict_acc,none"]) == {"ifeval": "prompt_level_strict_acc,none"}
    with pytest.raises(ValueError, match="TASK=METRIC"):
        parse_metrics(["ifeval"])
