"""The models report (opd.studies.report), the per-problem files it reads, and their writer."""

import json

import pytest

from opd.infra.lmeval_results import read_samples, read_score
from opd.studies import report, report_stats, stats
from opd.studies.evaluate import sample_rows, write_outputs
from opd.studies.stats import Estimate
from conftest import write_eval


def test_models_table_with_intervals(tmp_path):
    write_eval(tmp_path / "teacher", {"arith1": [1] * 80 + [0] * 20, "arith2": [1] * 50 + [0] * 50,
                                      "reverse": [1] * 25 + [0] * 75})
    args = report.argparse.Namespace(level=0.95, n_boot=2000)
    scores = report_stats.load_scores([("teacher", 0, tmp_path / "teacher")], ["arith1", "arith2", "reverse"], {})
    cols = report_stats.columns_of(["arith1", "arith2", "reverse"], ["reverse"])
    assert cols == {"arith1": ["arith1"], "arith2": ["arith2"], "reverse": ["reverse"],
                    "in_domain_avg": ["arith1", "arith2"], "ood": ["reverse"]}
    ests = report_stats.estimates(scores, cols, args)["teacher"]
    assert ests["in_domain_avg"].mean == pytest.approx(0.65) and ests["ood"].mean == pytest.approx(0.25)
    # in-domain: mean of two 100-problem tasks: SE = sqrt(.8·.2/100 + .5·.5/100) / 2 = 0.032 -> ±6.3 points
    e = ests["in_domain_avg"]
    assert (e.hi - e.lo) / 2 == pytest.approx(0.063, rel=0.12)
    md = report.to_markdown({"teacher": ests}, list(cols), 0.95, 2000)
    assert f"| teacher | 80.0 [{100 * ests['arith1'].lo:.1f}, {100 * ests['arith1'].hi:.1f}] |" in md
    assert "95% interval" in md


def test_cell_and_error_bars():
    e = Estimate(0.332, 0.29, 0.38, 1, 500)
    assert report_stats.cell(e) == "33.2 [29.0, 38.0]"
    assert report_stats.error_bars([e]) == [[pytest.approx(4.2)], [pytest.approx(4.8)]]


def test_bad_results_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="x.json"):
        read_score(tmp_path / "x.json", "arith1")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": {"arith2": {}}}))
    with pytest.raises(ValueError, match="bad.json"):
        read_score(bad, "arith1")


def test_samples_read_and_checked_against_the_score(tmp_path):
    write_eval(tmp_path, {"arith1": [1, 0, 1, 1]})
    assert read_samples(tmp_path / "arith1.samples.jsonl", "arith1") == {"0:h0": 1.0, "1:h1": 0.0, "2:h2": 1.0,
                                                                          "3:h3": 1.0}
    (tmp_path / "arith1.json").write_text(json.dumps({"results": {"arith1": {"exact_match,strict-match": 0.5}}}))
    with pytest.raises(ValueError, match=r"arith1.samples.jsonl: 4 problems with mean 0.7500, but arith1.json"):
        read_samples(tmp_path / "arith1.samples.jsonl", "arith1")
    with pytest.raises(FileNotFoundError, match="nope.samples.jsonl"):
        read_samples(tmp_path / "nope.samples.jsonl", "nope")


def test_old_samples_files_one_row_per_filter(tmp_path):
    """Files from before `correct` existed: read through the metric's column; duplicate ids are an error."""
    (tmp_path / "t.json").write_text(json.dumps({"results": {"t": {"exact_match,strict-match": 0.5}}}))
    (tmp_path / "t.samples.jsonl").write_text('{"doc_id": 0, "exact_match": 1}\n{"doc_id": 1, "exact_match": 0}\n')
    assert read_samples(tmp_path / "t.samples.jsonl", "t") == {"0": 1.0, "1": 0.0}
    (tmp_path / "t.samples.jsonl").write_text('{"doc_id": 0, "exact_match": 1}\n{"doc_id": 0, "exact_match": 0}\n')
    with pytest.raises(ValueError, match="problem 0 appears twice"):
        read_samples(tmp_path / "t.samples.jsonl", "t")


def fake_result(task):
    """An lm-eval result with two filters per problem, as lm-eval logs them."""
    samples = [{"doc_id": i, "doc_hash": f"h{i}", "target": "7", "resps": [["The answer is 7"]],
                "filtered_resps": [f], "filter": filt, "metrics": ["exact_match"], "exact_match": v}
               for i in range(2) for filt, f, v in (("strict-match", "7", float(i == 0)), ("flexible", "7", 1.0))]
    return {"results": {task: {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.5}},
            "samples": {task: samples}}


def test_samples_keep_one_row_per_problem_for_the_metric_filter(tmp_path):
    result = fake_result("arith1")
    rows = sample_rows(result, "arith1")
    assert [(r["doc_id"], r["correct"], r["filter"]) for r in rows] == [(0, 1.0, "strict-match"),
                                                                        (1, 0.0, "strict-match")]
    write_outputs(result, "arith1", tmp_path)
    assert read_samples(tmp_path / "arith1.samples.jsonl", "arith1") == {"0:h0": 1.0, "1:h1": 0.0}
    with pytest.raises(KeyError, match="no metric 'acc'"):
        sample_rows(result, "arith1", "acc,strict-match")


def test_old_and_new_samples_files_still_pair(tmp_path):
    """A base evaluated before doc_hash was kept pairs with a new evaluation on doc_id alone."""
    write_eval(tmp_path / "new", {"t": [1, 0, 1, 0]})
    (tmp_path / "old").mkdir()
    (tmp_path / "old/t.json").write_text(json.dumps({"results": {"t": {"exact_match,strict-match": 0.25}}}))
    (tmp_path / "old/t.samples.jsonl").write_text("".join(
        json.dumps({"doc_id": i, "exact_match": c}) + "\n" for i, c in enumerate([1, 0, 0, 0])))
    scores = report_stats.load_scores([("new", 0, tmp_path / "new"), ("old", 0, tmp_path / "old")], ["t"], {})
    comp = stats.compare(scores["new"], scores["old"], ["t"])
    assert comp.paired and comp.diff == pytest.approx(0.25)
