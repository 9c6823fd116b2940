"""opd.studies.study_check: the comparison of one study's reports across kernel settings."""

import csv
import json

import pytest

from opd.studies import study_check

TASKS = ("arith1", "arith2", "reverse")  # tests/config/smoke.yaml's benchmarks; its models: teacher, student_s


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _eval(d, task, correct):
    """<task>.samples.jsonl and <task>.json as opd.studies.evaluate writes them."""
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{task}.samples.jsonl").write_text("".join(
        json.dumps({"doc_id": i, "doc_hash": f"h{i}", "filter": "strict-match", "correct": float(c)}) + "\n"
        for i, c in enumerate(correct)))
    score = sum(correct) / len(correct)
    (d / f"{task}.json").write_text(json.dumps({"results": {task: {"exact_match,strict-match": score}}}))


def _study(root, student_arith1_avx2, verdict_avx2):
    """Two settings. Every base model answers the same 20 problems per task alike under both, except
    student_s on arith1 under avx2; training comparisons identical except the `full − base` verdict."""
    comp = ["table", "a", "b", "metric", "diff", "lo", "hi", "p", "p_holm", "verdict", "paired", "note"]
    for setting in ("default", "avx2"):
        for model in ("teacher", "student_s"):
            for task in TASKS:
                correct = [i % 2 for i in range(20)]  # 10 of 20 right
                if (setting, model, task) == ("avx2", "student_s", "arith1"):
                    correct = student_arith1_avx2
                _eval(root / setting / "eval" / model, task, correct)
        _write_csv(root / setting / "report/smoke/models.csv",
                   ["model", "in_domain_avg", "in_domain_avg_lo", "in_domain_avg_hi"],
                   [["teacher", 50, 40, 60], ["student_s", 50, 40, 60]])
        verdict = verdict_avx2 if setting == "avx2" else "better"
        _write_csv(root / setting / "report/smoke/training_comparisons.csv", comp,
                   [["student_s", "full", "base", "in_domain_avg", 12, 6, 18, 0.001, 0.002, verdict, True, ""],
                    ["student_s", "random", "full", "in_domain_avg", -1, -6, 4, 0.7, 1.0, "n.d.", True, ""]])


def _run(root, repo):
    with pytest.raises(SystemExit) as info:
        study_check.main(["--compare-only", "--out-root", str(root), "--settings", "default", "avx2",
                          "--configfiles", str(repo / "tests/config/smoke.yaml")])
    return info.value.code


def test_agreeing_settings_exit_zero(tmp_path, repo, capsys):
    # student_s on arith1 under avx2: 11 of 20 instead of 10, one problem flipped: far from resolved
    _study(tmp_path, [i % 2 for i in range(18)] + [1, 1], "better")
    code, out = _run(tmp_path, repo), capsys.readouterr().out
    assert code == 0 and out.strip().endswith(f"study-check: AGREE (default, avx2; {tmp_path})")
    assert "| student_s | default − avx2 | arith1 | -5.0 [" in out  # 10/20 − 11/20
    assert "| student_s | full − base | in_domain_avg | +12.0 better | +12.0 better |" in out


def test_a_resolved_base_difference_and_a_changed_verdict_disagree(tmp_path, repo, capsys):
    _study(tmp_path, [1] * 20, "n.d.")  # every arith1 problem right under avx2, half under default
    code, out = _run(tmp_path, repo), capsys.readouterr().out
    assert code == 1 and "study-check: DISAGREE" in out
    assert "DISAGREE: student_s arith1: default − avx2 = -50.0 points, worse" in out
    assert "DISAGREE: student_s: full − base (in_domain_avg): default better, avx2 n.d." in out
    assert "teacher" not in out.split("DISAGREE:", 1)[1]  # identical answers: no disagreement
    assert "random − full" not in out.split("DISAGREE:", 1)[1]  # same verdict: not a disagreement


def test_per_seed_builds_are_compared_as_base_models(tmp_path, repo, capsys):
    # train.student_builds: per_seed with seeds [0, 1]: the build student_s~build1 is a base model too; under
    # avx2 it answers every arith1 problem, under default half of them: a resolved difference, named.
    _study(tmp_path, [i % 2 for i in range(20)], "better")
    for setting in ("default", "avx2"):
        for task in TASKS:
            right = [1] * 20 if (setting, task) == ("avx2", "arith1") else [i % 2 for i in range(20)]
            _eval(tmp_path / setting / "eval" / "student_s~build1", task, right)
    overlay = tmp_path / "per_seed.yaml"
    overlay.write_text("train: {seeds: [0, 1], student_builds: per_seed}\n")
    with pytest.raises(SystemExit) as info:
        study_check.main(["--compare-only", "--out-root", str(tmp_path), "--settings", "default", "avx2",
                          "--configfiles", str(repo / "tests/config/smoke.yaml"), str(overlay)])
    out = capsys.readouterr().out
    assert info.value.code == 1
    assert "DISAGREE: student_s~build1 arith1: default − avx2 = -50.0 points, worse" in out
    assert "DISAGREE: student_s arith1" not in out  # the seed-0 student agrees


def _row(a, diff, half, verdict):
    return {"table": "student_s", "a": a, "b": "full", "metric": "in_domain_avg", "diff": str(diff),
            "lo": str(diff - half), "hi": str(diff + half), "verdict": verdict}


def test_consistency_tells_a_verdict_at_the_threshold_from_a_machine_dependence():
    # se = half-width / 1.96. ta_opd: +5 ± 4.9 (n.d.) vs +6 ± 4.9 (better): gap 1, se sqrt(2) * 2.5, z 0.283 -> p 0.777
    # (largest of the three: Holm leaves it):
    # consistent, listed because the verdicts differ. entropy: -4 ± 3.92 vs -20 ± 3.92: gap 16 over se 2.83,
    # z 5.7 -> resolved apart. random: +3 ± 2.94 better vs -3 ± 2.94 worse: opposite verdicts, always a problem.
    native = [_row("ta_opd", 5, 4.9, "n.d."), _row("entropy", -4, 3.92, "worse"), _row("random", 3, 2.94, "better")]
    avx2 = [_row("ta_opd", 6, 4.9, "better"), _row("entropy", -20, 3.92, "worse"), _row("random", -3, 2.94, "worse")]
    lines, problems = study_check.consistency({"native": native, "avx2": avx2})
    assert "| student_s | ta_opd − full | in_domain_avg | native − avx2 | -1.0 | 0.777 | n.d. / better |" in lines
    assert len(problems) == 2
    assert problems[0].startswith("student_s: entropy − full (in_domain_avg): native -4.0 vs avx2 -20.0 (Holm p 0.000")
    assert problems[1].endswith("random − full (in_domain_avg): native +3.0 vs avx2 -3.0 (opposite verdicts)")
