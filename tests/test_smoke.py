"""The whole DAG on a tiny config, through the real snakemake CLI, with two jobs at a time."""

import csv
import json
import os
import sys
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
RESULTS = "out"  # a results root that is not called results/, in a working directory elsewhere (--directory)


def _snakemake(python, repo: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(repo / "tests/config/smoke.yaml"), "--cores", "2", *extra]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default store
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    repo = Path(__file__).resolve().parents[1]
    workdir = tmp_path_factory.mktemp("smoke")
    proc = _snakemake(sys.executable, repo, workdir, "--config", f"results_dir={RESULTS}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (workdir / "results").exists()  # every output, log and the MLflow store went under RESULTS
    return workdir, yaml.safe_load((repo / "tests/config/smoke.yaml").read_text())


def test_report_has_every_model_and_benchmark(smoke):
    workdir, cfg = smoke
    with open(workdir / RESULTS / "report/smoke/models.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == list(cfg["models"])
    columns = [*cfg["evaluation"]["benchmarks"], "in_domain_avg", "ood"]
    assert list(rows[0]) == ["model", *columns, *(f"{c}_{b}" for c in columns for b in ("lo", "hi"))]
    for row in rows:  # every estimate inside its interval, and the interval never of zero width
        assert 0.0 <= float(row["in_domain_avg_lo"]) <= float(row["in_domain_avg"]) <= float(row["in_domain_avg_hi"])
        assert float(row["in_domain_avg_hi"]) > float(row["in_domain_avg_lo"])
    assert (workdir / RESULTS / "report/smoke/models.png").stat().st_size > 1000


def test_models_load_and_lm_eval_results_are_real(smoke):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, cfg = smoke
    for model in cfg["models"]:
        path = workdir / RESULTS / "models" / model
        AutoModelForCausalLM.from_pretrained(str(path))
        AutoTokenizer.from_pretrained(str(path))
        for task in cfg["evaluation"]["benchmarks"]:
            result = json.loads((workdir / RESULTS / f"eval/{model}/{task}.json").read_text())
            samples = [json.loads(line) for line in
                       (workdir / RESULTS / f"eval/{model}/{task}.samples.jsonl").read_text().splitlines()]
            assert len(samples) == cfg["world"]["n_bench"]
            # the reported score is the mean of the per-problem scores we kept
            mean = sum(s["exact_match"] for s in samples) / len(samples)
            assert len({s["doc_id"] for s in samples}) == len(samples)  # one row per problem
            assert result["results"][task]["exact_match,strict-match"] == pytest.approx(mean)


def test_one_finished_mlflow_run_per_job(smoke):
    from mlflow.tracking import MlflowClient

    workdir, cfg = smoke
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/{RESULTS}/mlflow.db")
    exp = client.get_experiment_by_name(cfg["study"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    students = [m for m, spec in cfg["models"].items() if spec["role"] == "student"]
    names = sorted(r.info.run_name for r in runs)
    expected = sorted(["toy_data", "tokenizer", "report", "diagnose"] + [f"sft[{m}]" for m in cfg["models"]]
                      + [f"lm_eval[{m}]" for m in cfg["models"]]  # evaluation.jobs: per_model
                      + [f"rollout[{m}]" for m in students]
                      + [f"{stage}[teacher/{m}]" for m in students for stage in ("score", "fixed_context")]
                      + ["report_training", "report_sweep"]
                      + [f"{stage}[{run}]" for run in _train_runs(cfg) for stage in ("train", "lm_eval")])
    assert names == expected
    for run in runs:  # the trained students' scores are attached to their training runs
        if run.info.run_name.startswith("train["):
            assert all(f"eval.{t}.accuracy" in run.data.metrics for t in cfg["evaluation"]["benchmarks"])
            assert "reverse_kl_all" in run.data.metrics and "frac_supervised" in run.data.metrics
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_name
        assert run.data.metrics, run.info.run_name
        assert run.data.tags["rule"] == run.info.run_name
    lm_runs = [r for r in runs if r.info.run_name.startswith("lm_eval")]
    assert all(any(k.endswith("accuracy") for k in r.data.metrics) for r in lm_runs)


def test_second_run_has_nothing_to_do(smoke):
    workdir, _ = smoke
    proc = _snakemake(sys.executable, Path(__file__).resolve().parents[1], workdir, "-n",
                      "--config", f"results_dir={RESULTS}")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_snakemake_report_gathers_tables_and_figures(smoke):
    """`snakemake --report` makes one self-contained page with every report() output, by category."""
    workdir, _ = smoke
    page = workdir / RESULTS / "report.html"
    proc = _snakemake(sys.executable, Path(__file__).resolve().parents[1], workdir, "--report", str(page),
                      "--config", f"results_dir={RESULTS}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = page.read_text()
    assert len(html) > 100_000  # the figures are embedded (base64), not linked
    for name in ("Models", "Diagnostics", "Training", "Sweep", "models.png", "training.png", "sweep.png",
                 "margin_reverse_kl.png", "release_points.png", "fixed_context.csv", "smoke"):
        assert name in html, name


def _train_runs(cfg) -> list[str]:
    """Run ids written out by hand for the smoke grid: full has no ratio, release+ta_opd has two."""
    assert cfg["train"]["methods"] == ["full", "release+ta_opd"] and cfg["train"]["ratio"] == [0.1, 0.3]
    return ["teacher/student_s/full/K~4/ratio~1/seed~0", "teacher/student_s/release+ta_opd/K~4/ratio~0.1/seed~0",
            "teacher/student_s/release+ta_opd/K~4/ratio~0.3/seed~0"]


def test_training_report(smoke):
    workdir, cfg = smoke
    md = (workdir / RESULTS / "report/smoke/training.md").read_text()
    for row in ["base", "full K=4", "release+ta_opd K=4 ρ=0.1", "release+ta_opd K=4 ρ=0.3"]:
        assert f"| {row} |" in md
    with open(workdir / RESULTS / "report/smoke/training_comparisons.csv") as fh:
        comps = {(r["a"], r["b"], r["metric"]): r for r in csv.DictReader(fh)}
    # each method point vs full (same K) and vs base, each on in-domain and OOD, all paired on problems
    assert set(comps) == {(a, b, m) for a in ["release+ta_opd K=4 ρ=0.1", "release+ta_opd K=4 ρ=0.3"]
                          for b in ["full K=4", "base"] for m in ["in_domain_avg", "ood"]} | {
        ("full K=4", "base", m) for m in ["in_domain_avg", "ood"]}
    assert all(r["paired"] == "True" and r["verdict"] in ("better", "worse", "n.d.") for r in comps.values())
    for run in _train_runs(cfg):
        metrics = json.loads((workdir / RESULTS / "train" / run / "metrics.json").read_text())
        assert metrics["step"] == cfg["train"]["steps"]
        assert 0.0 < metrics["frac_supervised"] <= 1.0


def test_sweep_report(smoke):
    workdir, _ = smoke
    md = (workdir / RESULTS / "report/smoke/sweep.md").read_text()
    assert "**release+ta_opd: in-domain avg**" in md and "| K | ρ=0.1 | ρ=0.3 |" in md
    assert "**full: OOD**" in md and "| K | all |" in md
    with open(workdir / RESULTS / "report/smoke/sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    # 1 point for full + 2 for release+ta_opd, each with an in-domain and an OOD cell
    assert len(rows) == 6 and {r["ratio"] for r in rows} == {"1", "0.1", "0.3"}
    assert (workdir / RESULTS / "report/smoke/sweep.png").stat().st_size > 1000


def test_diagnostic_study_outputs(smoke):
    workdir, cfg = smoke
    out = workdir / RESULTS / "report/smoke/diagnose"
    report = (out / "report.md").read_text()
    assert "Fixed-context gain by selector" in report
    for selector in cfg["diagnose"]["fixed_context"]["selectors"]:
        assert f"| {selector} |" in report
    for fig in ("margin_reverse_kl", "disagreement", "release_points"):
        assert (out / f"{fig}.png").stat().st_size > 1000
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["student"] for r in rows] == [m for m, s in cfg["models"].items() if s["role"] == "student"]
    assert int(rows[0]["rollouts"]) == cfg["diagnose"]["n_prompts"] * cfg["diagnose"]["samples"]


def test_copied_project_has_nothing_to_do(smoke, tmp_path):
    """A moved project (workflow and results) reruns nothing: no absolute path is a rule parameter."""
    import shutil

    workdir, _ = smoke
    repo, moved = Path(__file__).resolve().parents[1], tmp_path / "moved"
    for part in ("Snakefile", "workflow", "config", "envs", "tests/config"):
        copy = shutil.copytree if (repo / part).is_dir() else shutil.copy2
        (moved / "repo" / part).parent.mkdir(parents=True, exist_ok=True)
        copy(repo / part, moved / "repo" / part)
    shutil.copytree(workdir, moved / "work", symlinks=True)  # copy2: modification times kept, as `cp -a`
    proc = _snakemake(sys.executable, moved / "repo", moved / "work", "-n", "--config", f"results_dir={RESULTS}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def test_grown_grid_is_built_whatever_the_rerun_triggers(smoke, tmp_path):
    """A seed added to the grid plans its training runs even under `--rerun-triggers mtime`."""
    workdir, _ = smoke
    overlay = tmp_path / "grow.yaml"
    overlay.write_text("train: {seeds: [0, 1]}\n")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir), "-n",
           "--configfile", str(repo / "tests/config/smoke.yaml"), str(overlay), "--config", f"results_dir={RESULTS}",
           "--rerun-triggers", "mtime", "--cores", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for run in _train_runs(yaml.safe_load((repo / "tests/config/smoke.yaml").read_text())):
        assert f"train/{run.replace('seed~0', 'seed~1')}/metrics.json" in out, out[-3000:]


REF_RESULTS = "out_ref"  # the overlay's own results root: its sampled evaluations do not touch the smoke study's


@pytest.fixture(scope="module")
def reference_smoke(smoke):
    """tests/config/smoke_reference.yaml over the smoke config: three evaluation seeds with sampling on, then the
    models table and the side-by-side report against tests/config/smoke_reference.csv (made-up numbers)."""
    workdir, _ = smoke
    repo = Path(__file__).resolve().parents[1]
    targets = [f"{REF_RESULTS}/report/smoke_reference/{name}" for name in ("reference.md", "models.md")]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir), "--cores", "2",
           "--configfile", str(repo / "tests/config/smoke.yaml"), str(repo / "tests/config/smoke_reference.yaml"),
           "--config", f"results_dir={REF_RESULTS}", "--", *targets]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    page = f"{REF_RESULTS}/report.html"  # `snakemake --report` of the same targets: the Reference category
    proc = subprocess.run([*cmd[:-3], "--report", page, *cmd[-3:]], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir / REF_RESULTS, yaml.safe_load((repo / "tests/config/smoke_reference.yaml").read_text())


def test_evaluation_seeds_to_reference_report(reference_smoke):
    out, overlay = reference_smoke
    seeds = overlay["evaluation"]["seeds"]
    assert seeds == [0, 1, 2]
    for model in ("teacher", "student_s"):  # seed 0 where a study without seeds writes, the others beside it
        assert (out / f"eval/{model}/arith1.json").is_file()
        assert all((out / f"eval/{model}/evalseed~{s}/arith1.samples.jsonl").is_file() for s in seeds[1:])
    assert (out / "train/teacher/student_s/ta_opd/K~4/ratio~0.1/seed~0/eval/evalseed~2/reverse.json").is_file()
    assert " ± " in (out / "report/smoke_reference/models.md").read_text()  # mean ± std over the 3 seeds
    with open(out / "report/smoke_reference/reference.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["benchmark"]) for r in rows] == [("base", "arith1"), ("base", "avg"), ("full", "arith2"),
                                                             ("ta_opd", "reverse"), ("ta_opd", "avg")]
    for r in rows:
        assert int(r["eval_seeds"]) == 3
        assert float(r["diff"]) == pytest.approx(float(r["ours"]) - float(r["paper"]), abs=2e-3)
        assert float(r["ours_lo"]) <= float(r["ours"]) <= float(r["ours_hi"])
        assert r["within"] in ("yes", "no") if r["paper_std"] else r["within"] == "—"
    assert (out / "report/smoke_reference/reference.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert all(name in html for name in ("Reference", "reference.csv", "reference.png"))


def test_per_seed_student_builds_plan_one_build_per_seed(tmp_path):
    """`train.student_builds: per_seed`: seed 1 trains from its own build (SFT seed 1), evaluated as a base model."""
    overlay = tmp_path / "per_seed.yaml"
    overlay.write_text("train: {seeds: [0, 1], student_builds: per_seed, methods: [full]}\n")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path), "-n", "-p",
           "--configfile", str(repo / "tests/config/smoke.yaml"), str(overlay), "--config", f"results_dir={RESULTS}",
           "--cores", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"--out-dir {RESULTS}/models/student_s~build1 --name student_s~build1" in out
    assert "--max-chain 1 --seed 1 " in out  # the build is made like its student, with SFT seed `seed` + 1
    assert f"--student {RESULTS}/models/student_s~build1 " in out and "ratio~1/seed~1 --method full" in out
    assert f"--student {RESULTS}/models/student_s " in out and "ratio~1/seed~0 --method full" in out
    assert f"--out-dir {RESULTS}/eval/student_s~build1" in out  # the base row's second build
    assert "--seeds 0 1 --student-builds per_seed" in out


def _dry_run_with(tmp_path, evaluation: str) -> str:
    """The shell commands of a dry run of the smoke config with the evaluation block overlaid."""
    overlay = tmp_path / "evaluation.yaml"
    overlay.write_text(f"evaluation: {evaluation}\n")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path), "-n", "-p",
           "--configfile", str(repo / "tests/config/smoke.yaml"), str(overlay), "--config", f"results_dir={RESULTS}",
           "--cores", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("jobs", ["per_task", "per_model"])
def test_base_evaluation_jobs_per_task_or_per_model(tmp_path, jobs):
    """evaluation.jobs: one lm_eval job per (model, benchmark), or one per model running every benchmark."""
    out = _dry_run_with(tmp_path, f"{{jobs: {jobs}}}")
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "tests/config/smoke.yaml").read_text())
    models, tasks = list(cfg["models"]), cfg["evaluation"]["benchmarks"]
    commands = [line for line in out.splitlines() if "opd.studies.evaluate" in line and "--train-dir" not in line]
    if jobs == "per_task":
        assert len(commands) == len(models) * len(tasks) == 6
        assert sum(f"--model-name teacher --tasks arith1 --out-dir {RESULTS}/eval/teacher " in c for c in commands) == 1
    else:
        assert len(commands) == len(models) == 2
        assert all(f"--tasks {' '.join(tasks)} --out-dir" in c for c in commands)


@pytest.mark.parametrize("trained", ["separate", "with_training"])
def test_trained_students_evaluated_in_their_own_job_or_the_training_job(tmp_path, trained):
    """evaluation.trained: eval_trained jobs, or one process per run that trains then evaluates (opd.studies.chain)."""
    out = _dry_run_with(tmp_path, f"{{trained: {trained}}}")
    run = f"{RESULTS}/train/teacher/student_s/full/K~4/ratio~1/seed~0"
    trains = [line for line in out.splitlines() if "opd.engines.train --student" in line]
    evals = [line for line in out.splitlines() if "opd.studies.evaluate" in line and "--train-dir" in line]
    assert len(trains) == 3  # the smoke grid's runs
    evaluation = (f"opd.studies.evaluate --model-dir {run}/model --model-name teacher/student_s/full/K~4/ratio~1/seed~0"
                  f" --tasks arith1 arith2 reverse --out-dir {run}/eval --train-dir {run} --backend hf")
    if trained == "separate":
        assert not any("opd.studies.chain" in line for line in trains) and len(evals) == 3
        assert sum(f"python -m {evaluation}" in line for line in evals) == 1
    else:
        assert all("python -m opd.studies.chain opd.engines.train --student" in line for line in trains)
        assert evals == [line for line in trains if "--then opd.studies.evaluate" in line]
        assert sum(f" --study $OPD_STUDY --then {evaluation}" in line for line in trains) == 1
        assert "eval_trained" not in out


def test_the_teachers_sft_is_scheduled_first(tmp_path):
    """Every distillation waits for the teacher: its SFT job has priority 1, the students' the default 0."""
    out = _dry_run_with(tmp_path, "{}")
    jobs = out.split("rule sft_model:")[1:]
    priorities = {job.split("output: ")[1].split()[0].split("/")[-2]: "priority: 1" in job.split("\n\n")[0]
                  for job in jobs}
    assert priorities == {"teacher": True, "student_s": False}
