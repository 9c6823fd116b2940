"""Faults during training: a corrupt checkpoint, a killed run, a dead tracking server, a student rebuilt under a
run's checkpoints; none loses work or lies."""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from opd.engines import checkpoint, train
from opd.infra import tracking
from opd.worlds.miniature.sft import build_model

from test_distributed import _free_port
from test_train import Killed, _final_state, argv

COMMON = ("--method", "ta_opd", "--ratio", "0.3", "--steps", "3", "--checkpoint-every", "1", "--seed", "5")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _crash_after_saving(monkeypatch, step: int):
    real = train.save_checkpoint

    def save(out_dir, t, *rest, **kw):
        path = real(out_dir, t, *rest, **kw)
        if t == step:
            raise Killed
        return path

    monkeypatch.setattr(train, "save_checkpoint", save)
    return real


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("A")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out}/mlflow.db")
    train.main(argv(tiny_world, out, *COMMON, "--name", "A"))
    return _final_state(out)


@pytest.mark.parametrize("damaged", ["model.pt", "trainer.pt", "state.json"])
def test_corrupt_latest_checkpoint_is_set_aside_and_resume_replays_exactly(
        tiny_world, tmp_path, mlflow_uri, monkeypatch, uninterrupted, damaged):
    real = _crash_after_saving(monkeypatch, 2)
    with pytest.raises(Killed):
        train.main(argv(tiny_world, tmp_path, *COMMON, "--name", "B"))
    monkeypatch.setattr(train, "save_checkpoint", real)
    ckpts = tmp_path / "checkpoints"
    _truncate(ckpts / "step_000002" / damaged)  # what a machine dying before its writes reached the disk leaves
    with pytest.warns(checkpoint.CheckpointWarning) as warned:
        train.main(argv(tiny_world, tmp_path, *COMMON, "--name", "B"))
    (message,) = [str(w.message) for w in warned]
    assert message.startswith(f"checkpoint {ckpts / 'step_000002'} is corrupt (")
    assert message.endswith(f"set aside as {ckpts / 'corrupt-step_000002'}, resuming from {ckpts / 'step_000001'}")
    metrics_a, weights_a = uninterrupted
    metrics_b, weights_b = _final_state(tmp_path)
    assert metrics_a == metrics_b and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # a finished run keeps its last checkpoint only (opd.engines.checkpoint.prune_finished)
    assert sorted(p.name for p in ckpts.iterdir()) == ["corrupt-step_000002", "step_000003"]


def test_two_corrupt_checkpoints_are_an_error_and_one_set_aside_copy_is_kept(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (ckpts / f"step_00000{step}").mkdir(parents=True)
        (ckpts / f"step_00000{step}" / "state.json").write_text("{")
    (ckpts / "corrupt-step_000009").mkdir()
    with pytest.warns(checkpoint.CheckpointWarning, match="step_000003 is corrupt"), \
            pytest.raises(checkpoint.CheckpointError, match="step_000002 cannot be loaded either"):
        checkpoint.load_latest_checkpoint(tmp_path)
    assert sorted(p.name for p in ckpts.iterdir()) == ["corrupt-step_000003", "step_000001", "step_000002"]


def test_size_record_in_state_json_is_checked(tmp_path):
    path = tmp_path / "checkpoints" / "step_000001"
    path.mkdir(parents=True)
    torch.save({"w": torch.zeros(3)}, path / "model.pt")
    torch.save({"optimizer": {}}, path / "trainer.pt")
    sizes = checkpoint.file_sizes(path)
    (path / "state.json").write_text(json.dumps({"step": 1, "files": {**sizes, "model.pt": sizes["model.pt"] + 1}}))
    with pytest.warns(checkpoint.CheckpointWarning, match=f"{path / 'model.pt'} has {sizes['model.pt']} bytes, "
                                                           f"its state.json records {sizes['model.pt'] + 1}"):
        assert checkpoint.load_latest_checkpoint(tmp_path) is None


def test_each_flag_change_keeps_one_replaced_copy(tiny_world, tmp_path, mlflow_uri):
    base = argv(tiny_world, tmp_path, "--method", "full", "--steps", "1", "--samples", "1", "--max-new-tokens", "8",
                "--restart-if-flags-changed")
    run_ids = []
    for lr in ("1e-3", "2e-3", "3e-3"):
        train.main(base + ["--lr", lr])
        run_ids.append(json.loads((tmp_path / "checkpoints" / "step_000001" / "state.json").read_text())["run_id"])
        time.sleep(1.1)  # replaced-<seconds> names
    assert len(list(tmp_path.glob("checkpoints.replaced-*"))) == 1
    assert len(set(run_ids)) == 3


def test_resume_after_a_kill_logs_each_step_once_and_tags_the_run(tiny_world, tmp_path, mlflow_uri, monkeypatch):
    """Killed while step 3 runs, after step 2 was logged but only step 1 checkpointed."""
    real_step = train.run_step

    def die_in_step_3(tr, t):
        if t == 3:
            raise Killed
        return real_step(tr, t)

    args = argv(tiny_world, tmp_path, "--method", "full", "--steps", "3", "--checkpoint-every", "1", "--name", "K")
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda out, t, *r, **k: real_save(out, t, *r, **k) if t < 2 else None)
    monkeypatch.setattr(train, "run_step", die_in_step_3)
    with pytest.raises(Killed):
        train.main(args)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    run_id = json.loads((tmp_path / "checkpoints" / "step_000001" / "state.json").read_text())["run_id"]
    client.update_run(run_id, status="RUNNING")  # as a SIGKILL leaves it: no process ended it
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    monkeypatch.setattr(train, "run_step", real_step)
    train.main(args)
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == [1, 2, 3]  # before: [1, 2, 2, 3]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["opd.killed"] == "true" and run.data.tags["opd.resumed_from_step"] == "1"


def test_sigterm_ends_the_run_killed(tmp_path, mlflow_uri):
    code = ("import time\nfrom opd.infra import tracking\n"
            "with tracking.run('s', 'job') as run:\n    print(run.run_id, flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=mlflow_uri).get_run(run_id).info.status == "KILLED"


def test_dead_tracking_server_fails_in_seconds_before_models_load(tiny_world, tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError) as err:
        train.main(argv(tiny_world, tmp_path / "out", "--method", "full"))
    assert time.monotonic() - start < 10
    assert str(err.value).startswith(f"MLFLOW_TRACKING_URI={uri}: no MLflow server answers within 5 s (")
    assert "unset MLFLOW_TRACKING_URI to log to the local store" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_server_that_never_answers_times_out(monkeypatch):
    with socket.socket() as listener:  # accepts connections (the backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(tracking.TrackingError, match="no MLflow server answers within 1 s"):
            tracking.check_reachable(timeout=1)
        assert time.monotonic() - start < 5


def test_a_student_rebuilt_at_the_same_path_is_not_resumed(tiny_world, tmp_path):
    """A new SFT of the student (same path, same flags) makes the old checkpoints another run's: refused naming
    student_weights, and with --restart-if-flags-changed (the workflow's) set aside and trained afresh."""
    student = tmp_path / "student"
    shutil.copytree(tiny_world["student"], student)
    base = ["--student", str(student), "--teacher", str(tiny_world["teacher"]), "--world", "miniature",
            "--prompts", str(tiny_world["prompts"]), "--out-dir", str(tmp_path / "out"), "--method", "full",
            "--steps", "1", "--prompts-per-step", "2", "--samples", "1", "--max-new-tokens", "8", "--top-k", "4"]
    train.main(base)
    tok = tiny_world["tokenizer"]  # the same shapes, other weights (seed 3): a rebuild
    build_model(len(tok), 16, 1, 2, 1, 32, tok.eos_token_id, 3, head_dim=32).save_pretrained(str(student))
    with pytest.raises(ValueError, match="other flags \\(student_weights\\)"):
        train.main(base)
    assert train.main(base + ["--restart-if-flags-changed"])["step"] == 1
    assert len(list((tmp_path / "out").glob("checkpoints.replaced-*/step_000001/state.json"))) == 1


def test_weights_digest_sees_size_and_sampled_bytes_and_old_checkpoints_keep_resuming(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(bytes(1 << 20))  # 1 MiB: the samples sit at multiples of 64 KiB
    first = checkpoint.weights_digest(model)
    assert checkpoint.weights_digest(model) == first
    data = bytearray(1 << 20)
    data[5 * (1 << 20) // 16] = 1  # a byte at a sample
    weights.write_bytes(bytes(data))
    assert checkpoint.weights_digest(model) != first
    weights.write_bytes(bytes((1 << 20) + 1))  # one byte longer
    assert checkpoint.weights_digest(model) != first
    args = argparse.Namespace(student=model, teacher=model, lr=1e-4)
    flags = {"lr": "0.0001", "student": str(model), "teacher": str(model)}  # written before the weights were
    # recorded: compared on its flags alone
    assert checkpoint.changed_flags(args, {"flags": flags}) == []
    assert checkpoint.changed_flags(args, {"flags": {**flags, "student_weights": first}}) == ["student_weights"]
