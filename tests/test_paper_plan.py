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
