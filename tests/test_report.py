import json

import pytest

from opd.studies.report import build_table, read_score, to_markdown


def test_table_by_hand():
    scores = {"teacher": {"arith1": 1.0, "arith2": 0.5, "reverse": 0.25}}
    (row,) = build_table(scores, ["arith1", "arith2", "reverse"], ["reverse"])
    assert row["in_domain_avg"] == pytest.approx(75.0)
    assert row["ood"] == pytest.approx(25.0)
    md = to_markdown([row], ["model", "arith1", "in_domain_avg", "ood"])
    assert "| teacher | 100.0 | 75.0 | 25.0 |" in md


def test_bad_results_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="x.json"):
        read_score(tmp_path / "x.json", "arith1")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": {"arith2": {}}}))
    with pytest.raises(ValueError, match="bad.json"):
        read_score(bad, "arith1")
