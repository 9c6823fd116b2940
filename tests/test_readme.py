"""The README's command blocks run as written, in a scratch copy of the project, whatever `python` is on PATH."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Blocks not run here, and why: each README block must be listed here or run below.
NOT_RUN = {
    "make study": "the whole miniature study (about 18 minutes on 2 cores); `make test` runs the smoke study",
    "profiles/slurm": "needs a SLURM cluster and GPUs (tests/test_slurm.py runs the profile on a test cluster)",
}


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def runnable() -> list[str]:
    return [b for b in bash_blocks() if not any(key in b for key in NOT_RUN)]


def test_every_block_is_run_or_says_why_not():
    blocks = bash_blocks()
    assert len(blocks) == len(runnable()) + len(NOT_RUN)
    assert len(runnable()) == 1 and " -n" in runnable()[0]


@pytest.fixture
def scratch(tmp_path) -> tuple[Path, dict]:
    """The project's tracked files, its .venv (this interpreter's environment), and a PATH whose `python` is
    not that environment's: the trap the README fell into (rules called the first `python` on PATH)."""
    root = tmp_path / "project"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name, follow_symlinks=False)
    (root / ".venv").symlink_to(Path(sys.prefix))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\necho 'not the environment that runs Snakemake' >&2\nexit 3\n")
    (bin_dir / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    return root, env


def test_the_overlay_example_plans_as_written(scratch):
    root, env = scratch
    out = subprocess.run(["bash", "-e", "-c", runnable()[0]], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "This was a dry-run" in out.stdout + out.stderr


@pytest.mark.slow
def test_the_overlay_example_runs_without_dry_run_with_any_python_on_path(scratch):
    """Without -n the rules run, in the environment of .venv/bin/snakemake (the world's data: the first job)."""
    root, env = scratch
    block = runnable()[0].replace(" -n\n", " --cores 1 results_seed1/data/train_prompts.jsonl\n")
    assert block != runnable()[0]
    out = subprocess.run(["bash", "-e", "-c", block], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (root / "results_seed1" / "data" / "train_prompts.jsonl").is_file()
    assert "not the environment that runs Snakemake" not in out.stdout + out.stderr


def test_rule_shells_call_the_interpreter_that_runs_snakemake(tmp_path):
    from opd.infra import cli

    env = {"PATH": "/usr/bin:/bin"}
    prefix = cli.interpreter_functions(sys.executable)
    out = subprocess.run(["bash", "-c", prefix + "python -c 'import sys; print(sys.executable)'"], env=env,
                         capture_output=True, text=True)
    assert out.stdout.strip() == sys.executable
    assert cli.interpreter_functions(sys.executable, conda=True) == ""  # --sdm conda: the rule's own env
