"""MLflow tracking: one run per entry point called (a training job chained with its evaluation logs two),
grouped by study (one experiment per study).

The default store is `sqlite:///<results root>/mlflow.db` (no server; the root from `OPD_RESULTS`, which the
workflow sets from config `results_dir`, else `results`); `MLFLOW_TRACKING_URI` overrides it.
Snakemake runs several jobs at once and SQLite allows one writer: concurrent schema creation,
experiment creation and writes can fail with "database is locked" and silently drop metrics. So every
write to a SQLite store goes through one inter-process file lock next to the database, and metrics are
sent in one `log_batch` call (one transaction) rather than one call per metric.

Faults (docs/tracking.md): a server URI that does not answer is refused in seconds (`check_reachable`, called
by every entry point before models load); a run reopened after its process was killed logs each step once
(the steps it had logged after the checkpoint are not logged again) and is tagged `opd.killed`; a run ended
by SIGTERM or Ctrl-C ends KILLED, one whose checkpoints are replaced is marked KILLED (`mark_killed`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from opd.infra.io import InputError

RESULTS_ENV = "OPD_RESULTS"  # the results root the workflow exports to every job
_BATCH = 900  # MLflow caps a log_batch at 1000 metrics
PROBE_SECONDS = 5.0  # how long a tracking server gets to answer before the job is refused


class TrackingError(InputError):
    """The tracking store cannot be used; the message names the URI and the way out."""


def tracking_uri() -> str:
    """The store in use; a relative SQLite path is made absolute so every job sees the same file."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{os.environ.get(RESULTS_ENV, 'results')}/mlflow.db")
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            path = Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def check_reachable(timeout: float = PROBE_SECONDS) -> None:
    """A server store must answer its /health endpoint within `timeout` s, or TrackingError (files: no check).

    MLflow's own client retries for minutes before it gives up; this is asked once, before models load.
    """
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # something answers (a proxy, an auth wall): MLflow's own errors say more
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLFLOW_TRACKING_URI={uri}: no MLflow server answers within {timeout:g} s "
                            f"({reason}); start it, or unset MLFLOW_TRACKING_URI to log to the local store "
                            f"sqlite:///<results>/mlflow.db") from None


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _lock(uri: str):
    """An inter-process lock for SQLite stores; servers serialise writes themselves."""
    path = _sqlite_path(uri)
    if path is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(str(path) + ".lock", timeout=600)


def metric_name(key: str) -> str:
    """MLflow allows only [A-Za-z0-9_-. :/] in names: `release+ta_opd.ood` becomes `release_ta_opd.ood`."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]  # MLflow's param length limit
    return flat


class Run:
    """A handle on one MLflow run; every write takes the store's lock."""

    def __init__(self, client, run_id: str, uri: str, logged_steps: frozenset[int] = frozenset()):
        self.client, self.run_id, self.uri = client, run_id, uri
        self.logged_steps = logged_steps  # steps this run logged before a kill: not logged twice

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        if step in self.logged_steps:
            return
        now = int(time.time() * 1000)
        items = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), _BATCH):
            with _lock(self.uri):
                self.client.log_batch(self.run_id, metrics=items[start:start + _BATCH])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _flatten(params).items()]
        for start in range(0, len(items), 90):  # params per batch are capped at 100
            with _lock(self.uri):
                self.client.log_batch(self.run_id, params=items[start:start + 90])

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        with _lock(self.uri):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)


def _experiment_id(client, study: str, uri: str) -> str:
    exp = client.get_experiment_by_name(study)
    if exp is not None:
        return exp.experiment_id
    db = _sqlite_path(uri)
    # Keep artifacts beside the database instead of in ./mlruns of whatever directory the job ran in.
    location = (db.parent / "mlartifacts" / study).as_uri() if db else None
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(study, artifact_location=location)
    except MlflowException:  # another job created it first (server stores take no file lock)
        exp = client.get_experiment_by_name(study)
        if exp is None:
            raise
        return exp.experiment_id


def _steps_after(client, run_id: str, step: int) -> frozenset[int]:
    """Steps after `step` that the run already has metrics for (each step's metrics are one log_batch)."""
    keys = client.get_run(run_id).data.metrics
    return frozenset(m.step for key in keys for m in client.get_metric_history(run_id, key) if m.step > step)


def _reopen(client, run_id: str, resume_step: int | None) -> frozenset[int]:
    """Status back to RUNNING; a run still RUNNING had its process killed: tagged, and its steps after
    `resume_step` (redone by the resumed job) are returned so that they are not logged twice."""
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "opd.killed", "true")  # no process ends a SIGKILLed run: say so here
    client.update_run(run_id, status="RUNNING")
    if resume_step is None:
        return frozenset()
    client.set_tag(run_id, "opd.resumed_from_step", str(resume_step))
    return _steps_after(client, run_id, resume_step)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, `kill`) unwinds like Ctrl-C, so the run can end KILLED."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def run(study: str, rule: str, params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None, run_id: str | None = None,
        resume_step: int | None = None) -> Iterator[Run]:
    """Open a run named `rule` in experiment `study`; it ends FINISHED, FAILED on an exception, KILLED on
    SIGTERM or Ctrl-C.

    With `run_id`, reopen that existing run instead (status back to RUNNING; `study`, `rule` and
    `tags` are ignored): a job resumed from a checkpoint keeps one metric history. With `resume_step`
    (the checkpoint's step), steps after it that the run already has are not logged again, so every
    step has one row. `params` given again are logged again, and MLflow refuses a changed value: pass
    none when resuming.
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    all_tags = {"rule": rule, "study": study, **(tags or {})}
    if "SNAKEMAKE_JOBID" in os.environ:
        all_tags["snakemake_jobid"] = os.environ["SNAKEMAKE_JOBID"]
    if "SLURM_JOB_ID" in os.environ:
        all_tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    with _lock(uri):
        # The first client of a new SQLite store creates its schema: two at once collide, so inside the lock.
        client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp_id = _experiment_id(client, study, uri)
            run_id = client.create_run(exp_id, run_name=rule,
                                       tags={k: str(v) for k, v in all_tags.items()}).info.run_id
            logged: frozenset[int] = frozenset()
        else:
            logged = _reopen(client, run_id, resume_step)
    handle = Run(client, run_id, uri, logged)
    status = "FAILED"
    try:
        with _sigterm_as_exit():
            if params:
                handle.log_params(params)
            yield handle
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        with _lock(uri):
            client.set_terminated(handle.run_id, status)


def mark_killed(run_id: str) -> None:
    """End a run that no process will resume (e.g. its checkpoints were replaced) as KILLED, if still RUNNING."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    with _lock(uri):
        client = MlflowClient(tracking_uri=uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")


def log_to_run(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Add metrics to an existing run without reopening it or changing its status (e.g. a training run)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    with _lock(uri):
        client = MlflowClient(tracking_uri=uri)
    Run(client, run_id, uri).log_metrics(metrics, step=step)
