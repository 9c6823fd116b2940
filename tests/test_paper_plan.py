"""config/paper.yaml plans the papers' whole grid offline, with the job counts worked out by hand."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd import worlds
from opd.infra.config import validate_config as _validate


def validate_config(cfg: dict) -> dict:
    return _validate(cfg, checks=[worlds.config_problems])


def test_paper_config_is_valid(repo: Path):
    cfg = validate_config(yaml.safe_load((repo / "config/paper.yaml").read_text()))
    assert cfg["world"]["name"] == "paper" and all(m["hub"] for m in cfg["models"].values())


@pytest.mark.slow
def test_paper_grid_plans_offline(repo: Path, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(repo / "Snakefile"), "--directory",
                           str(tmp_path), "--configfile", str(repo / "config/paper.yaml"), "--cores", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.M))
    # Per pair: full and release run once per K (3 K x 3 seeds = 18); the 8 selectors run per K and ratio
    # (3 x 4 x 3 = 36 each, 288). Three pairs: 3 x 306 = 918 runs, each evaluated once.
    assert counts["train_opd"] == "918" and counts["eval_trained"] == "918"
    # 3 hub models x 7 benchmarks; rollouts per student (2), scores and fixed-context gains per pair (3)
    assert counts["lm_eval"] == "21" and counts["fetch_model"] == "3" and counts["dapo_data"] == "1"
    assert counts["rollout_initial"] == "2" and counts["score_initial"] == "3" and counts["fixed_context"] == "3"
    assert counts["total"] == "1874"


def _plan(repo: Path, tmp_path: Path, *configs: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(repo / "Snakefile"), "--directory",
                           str(tmp_path), "--configfile", *(str(repo / c) for c in configs), "--cores", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.M))


@pytest.mark.slow
def test_ta_opd_table3_plans_offline(repo: Path, tmp_path):
    counts = _plan(repo, tmp_path, "config/papers/ta_opd.yaml")
    # 4 pairs x 5 methods (full, entropy, tip, ta_opd, ta_opd_ent; K 16, ratio 0.1, one training seed) = 20 runs;
    # each evaluated once per evaluation seed: seed 0 by eval_trained, seeds 1-4 by eval_trained_seeded.
    assert (counts["train_opd"], counts["eval_trained"], counts["eval_trained_seeded"]) == ("20", "20", "80")
    # 6 hub models x 6 benchmarks, x 4 more evaluation seeds
    assert (counts["fetch_model"], counts["lm_eval"], counts["lm_eval_seeded"]) == ("6", "36", "144")
    # rollouts per student (1.7B, 4B, Qwen2.5-3B), scores and fixed-context gains per pair; the paper-vs-ours report
    assert (counts["rollout_initial"], counts["score_initial"], counts["fixed_context"]) == ("3", "4", "4")
    assert counts["report_reference"] == "1" and "report_sweep" not in counts
    assert counts["total"] == str(1 + 6 + 36 + 144 + 3 + 20 + 20 + 80 + 4 + 4 + 1 + 1 + 1 + 1 + 1)  # dapo_data ... all


@pytest.mark.slow
def test_ta_opd_table4_overlay_plans_offline(repo: Path, tmp_path):
    counts = _plan(repo, tmp_path, "config/papers/ta_opd.yaml", "config/papers/ta_opd_table4.yaml")
    # 2 pairs x (full once + ta_opd at 4 ratios) = 10 runs, 5 evaluation seeds each
    assert (counts["train_opd"], counts["eval_trained"], counts["eval_trained_seeded"]) == ("10", "10", "40")
    assert (counts["rollout_initial"], counts["score_initial"], counts["report_sweep"]) == ("1", "2", "1")
    assert counts["total"] == "258"  # with the 6 models x 6 benchmarks x 5 seeds of Table 3


def test_ta_opd_config_is_valid_and_labels_the_stand_in(repo: Path):
    from opd.studies import reference, validate
    from opd.studies.evaluate import code_execution_problems

    cfg = validate_config(validate.load([repo / "config/papers/ta_opd.yaml"]))
    assert cfg["evaluation"]["seeds"] == [0, 1, 2, 3, 4] and cfg["signals"]["variant"] == "official"
    assert cfg["models"]["qwen3_8b_standin"]["hub"] == "Qwen/Qwen3-8B"  # the stand-in is in the name
    assert code_execution_problems(cfg, repo) == [] and reference.config_problems(cfg, repo) == []
    cfg["evaluation"]["allow_code_execution"] = False
    assert code_execution_problems(cfg, repo) == [
        "evaluation.benchmarks[3]: 'humaneval_instruct' executes model-written code; set "
        "evaluation.allow_code_execution: true to allow it (docs/paper.md, 'HumanEval')"]
    table4 = validate_config(validate.load([repo / "config/papers/ta_opd.yaml",
                                            repo / "config/papers/ta_opd_table4.yaml"]))
    assert reference.config_problems(table4, repo) == []
