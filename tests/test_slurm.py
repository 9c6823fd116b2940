"""The SLURM profile against a real SLURM cluster: the smoke study, failing jobs, and a preempted training job.

Needs a running cluster whose jobs see this filesystem and this Python: `make test-slurm` starts a one-node
cluster on this machine (tests/slurm/start_cluster.sh: munged, slurmctld, slurmd from Debian's slurm-wlm),
runs this file with OPD_SLURM_TEST=1 and stops the cluster again. Without OPD_SLURM_TEST=1 it is skipped.

The profile under test is workflow/profiles/slurm/config.yaml itself, with only what a cluster without
accounting needs changed (tests/slurm/README.md): jobs are polled with squeue (no slurmdbd), the first poll
comes after 2 s, and the partitions are the test cluster's `cpu` and `gpu` (one fake GPU, gres.conf
File=/dev/null). Retries, requeueing, kept job logs and default resources are the real profile's.
"""

import filecmp
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "workflow/profiles/slurm/config.yaml"
SMOKE = REPO / "tests/config/smoke.yaml"
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", re.M)


def _cluster_up() -> str | None:
    """None if a SLURM controller answers and has a usable node, else why not."""
    if shutil.which("sinfo") is None:
        return "no `sinfo` on PATH (install slurm-wlm: tests/slurm/start_cluster.sh does)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "`sinfo` timed out: no SLURM controller answers"
    if out.returncode != 0:
        return f"`sinfo` failed: {out.stderr.strip()}"
    if not {"idle", "mixed", "allocated"} & set(out.stdout.split()):
        return f"no usable node (node states: {out.stdout.split()})"
    return None


if not os.environ.get("OPD_SLURM_TEST"):
    pytest.skip("SLURM tests need a cluster: run `make test-slurm` (or tests/slurm/start_cluster.sh, then "
                "OPD_SLURM_TEST=1 pytest -m slurm tests/test_slurm.py)", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster():
    why = _cluster_up()
    if why:  # asked for (OPD_SLURM_TEST=1) but not there: a failure, not a skip
        pytest.fail(f"OPD_SLURM_TEST is set but the SLURM cluster is not usable: {why}")
    return {"cpus": int(_run(["sinfo", "-h", "-o", "%c"]).split()[0])}


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout


def _env() -> dict:
    """Jobs inherit the submitting environment (sbatch --export=ALL): this venv's python first on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def profile(tmp_path_factory, cluster) -> Path:
    """The real profile with the test cluster's partitions and squeue polling (no accounting here)."""
    root = tmp_path_factory.mktemp("profile")
    cfg = yaml.safe_load(PROFILE.read_text())
    cfg["slurm-status-command"] = "squeue"  # no slurmdbd; MinJobAge keeps finished jobs in squeue
    cfg["slurm-init-seconds-before-status-checks"] = 2
    cfg["default-resources"].pop("slurm_account", None)
    (root / "partitions.yaml").write_text(yaml.safe_dump(
        {"partitions": {"cpu": {"max_gpu": 0}, "gpu": {"max_gpu": 1}}}))
    cfg["slurm-partition-config"] = str(root / "partitions.yaml")
    (root / "slurm").mkdir()
    (root / "slurm/config.yaml").write_text(yaml.safe_dump(cfg))
    return root / "slurm"


def _snakemake(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile", timeout: int = 900,
               **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), *args]
    if popen:
        return subprocess.Popen(cmd, env=_env(), **popen)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _submissions(log: str) -> list[tuple[str, str]]:
    """(SLURM job id, rule) of every submission snakemake reported."""
    return [(jobid, re.search(r"/rule_([^/]+)/", path).group(1)) for jobid, path in SUBMITTED.findall(log)]


def _squeue() -> dict[str, dict]:
    """Every job the controller knows (finished ones for MinJobAge, 1 h here): id -> state, name, partition."""
    out = _run(["squeue", "--states=all", "-h", "-o", "%i|%T|%j|%P"])
    return {i: {"state": s, "name": n, "partition": p}
            for i, s, n, p in (line.split("|") for line in out.splitlines())}


def _scontrol(jobid: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in _run(["scontrol", "-o", "show", "job", jobid]).split() if "=" in kv)


# --- the smoke study through SLURM, against a local run -----------------------------------------------------

# Outputs that two local runs (threads: 1) reproduce bit for bit; eval .json files (timings), metrics.json
# (tokens_per_second), checkpoints' trainer.pt/state.json and the MLflow store are not among them.
DETERMINISTIC = ["results/data/*.jsonl", "results/tokenizer/tokenizer.json", "results/models/*/model.safetensors",
                 "results/diagnose/**/rollouts.safetensors", "results/diagnose/**/scores.safetensors",
                 "results/train/**/model/model.safetensors"]
# ...made by these rules and their inputs: all the local reference run has to do.
REFERENCE_RULES = ["train_opd", "score_initial"]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, profile):
    """The whole smoke DAG through the profile (the training jobs asking for one GPU each) and, at the same
    time, a local run without SLURM of the rules whose outputs are compared."""
    local_dir = tmp_path_factory.mktemp("local_reference")
    with open(local_dir / "snakemake.out", "w") as fh:
        local = _snakemake(local_dir, "--configfile", str(SMOKE), "--cores", "1", "--until", *REFERENCE_RULES,
                           stdout=fh, stderr=subprocess.STDOUT)
    try:
        workdir = tmp_path_factory.mktemp("slurm_smoke")
        gpu = workdir / "gpu.yaml"
        gpu.write_text(yaml.safe_dump({"resources": {"train": {"gpu": 1}}}))
        proc = _snakemake(workdir, "--configfile", str(SMOKE), str(gpu), "--profile", str(profile))
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-6000:]
        assert local.wait(timeout=900) == 0, (local_dir / "snakemake.out").read_text()[-4000:]
    finally:
        if local.poll() is None:
            local.kill()
    return {"slurm": workdir, "log": log, "local": local_dir}


@pytest.fixture(scope="module")
def slurm_smoke(smoke_runs):
    return smoke_runs["slurm"], smoke_runs["log"]


def test_every_job_ran_as_a_slurm_job(slurm_smoke):
    workdir, log = slurm_smoke
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    subs = _submissions(log)
    executed = set(re.findall(r"^(?:local)?rule (\w+):$", log, re.M)) - {"all"}
    assert {"toy_data", "sft_model", "train_opd", "lm_eval"} <= executed
    assert {rule for _, rule in subs} == executed  # every rule but the target went through sbatch
    assert len(subs) == len(set(subs)) == log.count("Finished jobid") - 1  # one submission per job, no retries
    queue = _squeue()
    for jobid, rule in subs:
        assert queue[jobid]["state"] == "COMPLETED", (jobid, rule, queue.get(jobid))
        assert queue[jobid]["name"] == run_id  # jobs are named after the run: how the profile polls them
        assert (workdir / f".snakemake/slurm_logs/rule_{rule}").is_dir()  # slurm-keep-successful-logs
    kept = {p.stem for p in (workdir / ".snakemake/slurm_logs").rglob("*.log")}
    assert {jobid for jobid, _ in subs} <= kept


def test_gpu_rules_get_a_gpu_in_the_gpu_partition(slurm_smoke):
    _, log = slurm_smoke
    subs = _submissions(log)
    assert any(rule == "train_opd" for _, rule in subs)
    for jobid, rule in subs:
        job = _scontrol(jobid)
        if rule == "train_opd":  # resources.train.gpu = 1 -> --gpus=1, placed in the partition with GPUs
            assert job["Partition"] == "gpu" and job.get("TresPerJob") == "gres:gpu:1", (rule, job)
        else:
            assert job["Partition"] == "cpu" and "gpu" not in job.get("TresPerJob", ""), (rule, job)
        assert job["Requeue"] == "1", (rule, job)  # slurm-requeue: true; the cluster's default is JobRequeue=0


def test_outputs_equal_a_local_run(smoke_runs):
    from safetensors.torch import load_file
    import torch

    slurm_dir, local_reference = smoke_runs["slurm"], smoke_runs["local"]
    compared = 0
    for pattern in DETERMINISTIC:
        ours = sorted(p.relative_to(slurm_dir) for p in slurm_dir.glob(pattern))
        theirs = sorted(p.relative_to(local_reference) for p in local_reference.glob(pattern))
        assert ours and ours == theirs, pattern
        for rel in ours:
            a, b = slurm_dir / rel, local_reference / rel
            if rel.suffix == ".safetensors":  # the tensors (file bytes may differ in metadata order)
                ta, tb = load_file(str(a)), load_file(str(b))
                assert ta.keys() == tb.keys(), rel
                assert all(torch.equal(ta[k], tb[k]) for k in ta), rel
            else:
                assert filecmp.cmp(a, b, shallow=False), rel
            compared += 1
    assert compared >= 10


# --- failing jobs: reported, retried per the profile ---------------------------------------------------------

def test_failing_jobs_are_retried_then_reported(tmp_path, profile):
    retries = yaml.safe_load(PROFILE.read_text())["retries"]
    assert retries >= 1
    proc = _snakemake(tmp_path, "--profile", str(profile), snakefile=REPO / "tests/slurm/retry.smk", timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Error in rule always_fails:" in log
    subs = _submissions(log)
    fails = [jobid for jobid, rule in subs if rule == "always_fails"]
    flaky = [jobid for jobid, rule in subs if rule == "flaky"]
    assert len(fails) == retries + 1 and len(flaky) == 2, subs  # every attempt is a new SLURM job
    queue = _squeue()
    assert [queue[j]["state"] for j in fails] == ["FAILED"] * (retries + 1)
    assert [queue[j]["state"] for j in flaky] == ["FAILED", "COMPLETED"]
    # each attempt ran in its own SLURM job and knew its attempt number
    assert (tmp_path / "always_fails.attempts").read_text().splitlines() == [
        f"attempt {i + 1} job {j}" for i, j in enumerate(fails)]
    assert (tmp_path / "flaky.attempts").read_text().splitlines() == [
        f"attempt {i + 1} job {j}" for i, j in enumerate(flaky)]
    assert (tmp_path / "flaky.done").exists() and not (tmp_path / "always_fails.done").exists()


# --- preemption: SLURM requeues the training job, which resumes from its checkpoint ---------------------------

STEPS, EVERY = 500, 25


def _wait(what: str, cond, timeout: float, proc: subprocess.Popen, out: Path):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"snakemake exited ({proc.returncode}) while waiting for {what}:\n"
                        f"{out.read_text()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{out.read_text()[-4000:]}")


def test_preempted_training_is_requeued_and_resumes(tmp_path, profile, cluster, slurm_smoke):
    """A training job through the profile is preempted by a job of a higher-priority partition; SLURM
    requeues it (the profile submits with --requeue), the same job id runs again, and opd.engines.train resumes
    from its latest checkpoint. Snakemake waits through it and finishes with success."""
    smoke_dir, _ = slurm_smoke
    for part in ("results/data", "results/tokenizer", "results/models"):  # upstream outputs, mtimes kept
        shutil.copytree(smoke_dir / part, tmp_path / part)
    longer = tmp_path / "train.yaml"
    longer.write_text(yaml.safe_dump({"train": {"methods": ["full"], "steps": STEPS, "checkpoint_every": EVERY}}))
    out = tmp_path / "snakemake.out"
    with open(out, "w") as fh:
        proc = _snakemake(tmp_path, "--configfile", str(SMOKE), str(longer), "--profile", str(profile),
                          "--until", "train_opd", stdout=fh, stderr=subprocess.STDOUT)
    try:
        jobid = _wait("the training job's submission", lambda: [j for j, r in _submissions(out.read_text())
                                                               if r == "train_opd"], 300, proc, out)[0]
        ckpt = _wait("a checkpoint", lambda: list(tmp_path.glob("results/train/**/checkpoints/step_*/state.json")),
                     300, proc, out)
        run_dir = ckpt[0].parents[2]
        assert not (run_dir / "metrics.json").exists(), "training finished before the test could preempt it"
        # the preemptor wants every CPU of the node: the running training job has to make room
        urgent = _run(["sbatch", "--parsable", "-p", "urgent", "-c", str(cluster["cpus"]), "--mem", "100",
                       "-o", "/dev/null", "--wrap", "sleep 1"]).strip()
        _wait("the training job's requeue", lambda: _scontrol(jobid).get("Restarts") == "1", 60, proc, out)

        seen_pending = []

        def running_again() -> bool:  # first COMPLETING (killed), then PENDING (requeued), then RUNNING
            job = _scontrol(jobid)
            if job["JobState"] == "PENDING":
                seen_pending.append(job.get("Reason"))
                if job.get("Reason") == "BeginTime":
                    # SLURM holds a requeued job back for 120 s; let it start as soon as the node is free
                    subprocess.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"], check=True,
                                   timeout=30)
            return bool(seen_pending) and job["JobState"] in ("RUNNING", "COMPLETING", "COMPLETED")

        _wait("the requeued job to run again", running_again, 180, proc, out)
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = out.read_text()
    assert rc == 0, log[-6000:]
    assert _squeue()[urgent]["state"] == "COMPLETED"
    job = _scontrol(jobid)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["Requeue"] == "1", job
    # one submission: the requeued SLURM job came back, not a snakemake retry (which would be a new job id)
    assert [j for j, r in _submissions(log) if r == "train_opd"] == [jobid], _submissions(log)
    assert "Trying to restart" not in log
    # the rule's log is rewritten by the second run: its progress bar starts at a checkpointed step > 0
    train_log = next(tmp_path.glob("results/logs/train/**/*.log")).read_text()
    start, total = map(int, re.search(r"opd\[full\]:[^|]*\|[^|]*\|\s*(\d+)/(\d+)", train_log).groups())
    assert total == STEPS and 0 < start < STEPS and start % EVERY == 0, train_log[:2000]
    assert yaml.safe_load((run_dir / "metrics.json").read_text())["step"] == STEPS


def test_gpu_request_the_partition_cannot_meet_is_reported(tmp_path, profile):
    """A rule asking for more GPUs than any node of its partition has: SLURM refuses it at submission
    (there is no job, so no job log), and snakemake names the rule with SLURM's own message."""
    proc = _snakemake(tmp_path, "--profile", str(profile), "--retries", "0",
                      snakefile=REPO / "tests/slurm/gpu.smk", timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Error in rule needs_gpus:" in log
    assert "Requested node configuration is not available" in log  # sbatch's error, passed on verbatim
    assert "-p cpu" in log and "--gpus=4" in log
    assert not (tmp_path / "needs_gpus.done").exists()
