"""opd.studies.study_check: the comparison of one study's reports across kernel settings."""

import csv

import pytest

from opd.studies import study_check


def _write(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _reports(root, base_b, verdict_b):
    header = ["model", "in_domain_avg", "ood", "in_domain_avg_lo", "in_domain_avg_hi", "ood_lo", "ood_hi"]
    comp = ["table", "a", "b", "metric", "diff", "lo", "hi", "p", "p_holm", "verdict", "paired", "note"]
    for setting, score, verdict in (("default", 40.0, "better"), ("avx2", base_b, verdict_b)):
        _write(root / setting / "report/miniature/models.csv", header, [["st", score, 90, score - 5, score + 5, 85, 95]])
        _write(root / setting / "report/miniature/training_comparisons.csv", comp,
               [["st", "full", "base", "in_domain_avg", 12, 6, 18, 0.001, 0.002, verdict, True, ""],
                ["st", "random", "full", "in_domain_avg", -1, -6, 4, 0.7, 1.0, "n.d.", True, ""]])


def test_agreeing_settings_exit_zero(tmp_path, capsys):
    _reports(tmp_path, 44.0, "better")  # 44 lies in [35, 45] and 40 in [39, 49]
    with pytest.raises(SystemExit) as info:
        study_check.main(["--compare-only", "--out-root", str(tmp_path), "--settings", "default", "avx2",
                          "--configfiles", "config/config.yaml"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.strip().endswith("study-check: AGREE (default, avx2; " + str(tmp_path) + ")")
    assert "| st | full − base | in_domain_avg | +12.0 better | +12.0 better |" in out


def test_a_score_outside_the_other_interval_and_a_changed_verdict_disagree(tmp_path, capsys):
    _reports(tmp_path, 46.0, "n.d.")  # 46 is outside [35, 45], 40 outside [41, 51]
    with pytest.raises(SystemExit) as info:
        study_check.main(["--compare-only", "--out-root", str(tmp_path), "--settings", "default", "avx2",
                          "--configfiles", "config/config.yaml"])
    out = capsys.readouterr().out
    assert info.value.code == 1 and "study-check: DISAGREE" in out
    assert "DISAGREE: st in_domain_avg: 46.0 under avx2 is outside [35.0, 45.0] under default" in out
    assert "DISAGREE: st in_domain_avg: 40.0 under default is outside [41.0, 51.0] under avx2" in out
    assert "DISAGREE: st: full − base (in_domain_avg): default better, avx2 n.d." in out
    assert "random − full" not in out.split("DISAGREE:", 1)[1]  # same verdict: not a disagreement
