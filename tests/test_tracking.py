import multiprocessing as mp

import pytest

from opd.infra import tracking

N_METRICS, N_STEPS = 40, 5


def _log_many(uri: str, study: str, rule: str, barrier) -> None:
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    barrier.wait()  # both processes create the schema, the experiment and their runs at once
    with tracking.run(study, rule, params={"who": rule}) as run:
        for step in range(N_STEPS):
            run.log_metrics({f"m{i}": step * 100 + i for i in range(N_METRICS)}, step=step)


def _runs(uri: str, study: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    return client, client.search_runs([exp.experiment_id])


def test_two_processes_lose_no_metric(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_log_many, args=(uri, "concurrency", f"job{i}", barrier)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    client, runs = _runs(uri, "concurrency")
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.params["who"] == r.info.run_name
        for i in range(N_METRICS):
            history = client.get_metric_history(r.info.run_id, f"m{i}")
            assert sorted((m.step, m.value) for m in history) == [(s, s * 100 + i) for s in range(N_STEPS)]


def test_failed_block_marks_run_failed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RuntimeError):
        with tracking.run("s", "boom") as run:
            run.log_metrics({"x": 1.0})
            raise RuntimeError("stage failed")
    _, (r,) = _runs(uri, "s")
    assert r.info.status == "FAILED" and r.data.metrics["x"] == 1.0


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/results/mlflow.db"


def test_run_id_reopens_the_same_run(tmp_path, monkeypatch):
    """A job resumed from a checkpoint writes on into its first run, FAILED → RUNNING → FINISHED."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RuntimeError):
        with tracking.run("s", "train", params={"lr": 0.1}) as first:
            first.log_metrics({"loss": 2.0}, step=1)
            raise RuntimeError("killed")
    with tracking.run("s", "ignored", run_id=first.run_id) as again:
        client, (r,) = _runs(uri, "s")
        assert again.run_id == first.run_id and r.info.status == "RUNNING"
        again.log_metrics({"loss": 1.0}, step=2)
    client, (r,) = _runs(uri, "s")
    assert r.info.status == "FINISHED" and r.info.run_name == "train" and r.data.params == {"lr": "0.1"}
    assert sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss")) == [(1, 2.0), (2, 1.0)]


def test_metric_names_are_made_valid_for_mlflow():
    assert tracking.metric_name("student_s.release+ta_opd.ood") == "student_s.release_ta_opd.ood"
    assert tracking.metric_name("eval.arith1.accuracy") == "eval.arith1.accuracy"
