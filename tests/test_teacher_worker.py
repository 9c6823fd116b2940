"""The teacher in its own process (`--teacher-placement worker`): the same scores as in process, exactly."""

import json
import os
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.engines import teacher_worker
from opd.engines.rollout import Rollouts, generate_hf
from opd.engines.score import score_rollouts
from opd.infra.io import Fault


def _rollouts(tiny_world, K=4):
    tok = tiny_world["tokenizer"]
    student = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"])).eval()
    prompts = [tok(f"Question: Start with {i}. Add 3. What is the result?\nAnswer:")["input_ids"] for i in range(5)]
    tensors = generate_hf(student, tok, prompts, K, 1.0, 1.0, 12, seed=3, batch_size=5)
    return student, Rollouts([str(i) for i in range(5)], tensors)


def test_worker_scores_equal_in_process_scores_exactly_exact_signals_included(tiny_world):
    student, rollouts = _rollouts(tiny_world)
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_world["teacher"])).eval()
    torch.set_num_threads(1)  # the worker runs with --threads 1: the same kernels, the same sums
    want = score_rollouts(teacher, rollouts, 4, 2, student=student)  # batch 2: several scoring batches
    with teacher_worker.TeacherWorker(tiny_world["teacher"], device="cpu", dtype="float32", threads=1) as w:
        got = w.score(rollouts, 4, 2)
        got["s_on_t_logprobs_NK"] = teacher_worker.student_on_teacher_topk(student, rollouts, got["t_topk_ids_NK"], 4, 2)
        work = w.work_dir
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert not work.exists()  # its files go with it


def test_a_teacher_worker_that_dies_mid_run_gives_one_clear_error(tiny_world):
    _, rollouts = _rollouts(tiny_world)
    with teacher_worker.TeacherWorker(tiny_world["teacher"], device="cpu", dtype="float32", threads=1) as w:
        w.score(rollouts, 4, 8)
        os.kill(w.proc.pid, 9)
        w.proc.wait()
        with pytest.raises(Fault, match=r"teacher worker (is gone|exited) \(code -9: killed by SIGKILL\)"):
            w.score(rollouts, 4, 8)


def test_a_dead_worker_is_one_line_on_stderr_not_a_traceback(python):
    """What the trainer prints (opd.infra.cli.run) when its worker dies: one line; OPD_TRACEBACK=1 for the rest."""
    code = ("import os, sys\nfrom opd.engines.worker_proc import WorkerProcess\nfrom opd.infra import cli\n"
            "class W(WorkerProcess):\n    name = 'teacher worker'\n"
            "cli.run(lambda: W([sys.executable, '-c', 'import os; os.kill(os.getpid(), 9)'], dict(os.environ)))\n")
    run = subprocess.run([python, "-c", code], capture_output=True, text=True, env={**os.environ, "OPD_TRACEBACK": ""})
    assert run.returncode == 1
    assert run.stderr == ("opd: error: the teacher worker exited (code -9: killed by SIGKILL) without answering; "
                          "its log is above on stderr\n")
    run = subprocess.run([python, "-c", code], capture_output=True, text=True, env={**os.environ, "OPD_TRACEBACK": "1"})
    assert "Traceback" in run.stderr and run.stderr.rstrip().endswith("killed by SIGKILL) without answering; its log "
                                                                       "is above on stderr")


def test_training_with_a_teacher_worker_replays_in_process_training(tiny_world, tmp_path, monkeypatch):
    from opd.engines import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    base = ["--student", str(tiny_world["student"]), "--teacher", str(tiny_world["teacher"]), "--world", "miniature",
            "--prompts", str(tiny_world["prompts"]), "--method", "ta_opd", "--ratio", "0.3", "--steps", "2",
            "--top-k", "4", "--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "10", "--lr", "1e-3",
            "--study", "test_teacher_worker", "--batch-size", "3"]
    a = train.main([*base, "--out-dir", str(tmp_path / "a")])
    b = train.main([*base, "--out-dir", str(tmp_path / "b"), "--teacher-placement", "worker"])
    assert a.keys() == b.keys()
    assert {k: v for k, v in a.items() if k != "tokens_per_second"} == \
        {k: v for k, v in b.items() if k != "tokens_per_second"}
    wa = torch.load(tmp_path / "a/checkpoints/step_000002/model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b/checkpoints/step_000002/model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "b/metrics.json").read_text()) == b
