"""FSDP2 (`--sharding fsdp`) on 2 CPU ranks with gloo: one update equals one process's, checkpoints resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.engines import distributed, train, update
from opd.engines.score import score_rollouts
from test_distributed import _argv, _free_port

# fp32 on both sides; the ranks' gradients are summed in another order than one process's backward sums
# them, so the weights after the step agree to rounding (|Δ| <= 1e-6 at lr 1e-3), not bit for bit.
ATOL = 1e-6


def _one_update(rank: int, world: int, port: int, argv: list[str], out: str, uneven: bool = False) -> None:
    """Sample and score the whole batch as one process does, then take one update on this rank's half.

    Every rank draws the same rollouts (a 1-rank context), keeps the mask only on its own half of the
    sequences and lets `loss_scale` weigh it: the sharded step must be the whole batch's step. `uneven`:
    the last sequence supervises nothing, and on two ranks each rank's budget holds one sequence, so rank 0
    runs two micro-batches and rank 1 one (their counts are written to mbs<rank>.json).
    """
    import datetime

    import torch.distributed as dist

    if world > 1:  # a rank left waiting in a collective fails after a minute instead of hanging the test
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    ctx = distributed.Context(rank, world)
    tr = train.setup(train.parse_args(argv), ctx=ctx)
    alone = train.dataclasses.replace(tr, dist=distributed.Context())
    rollouts, _ = train.sample(alone, t=1)
    scores = score_rollouts(tr.teacher, rollouts, tr.args.top_k, 8, student=train.inference_student(tr))
    sig = train.batch_signals(rollouts.tensors, scores, margin="top2")  # the paper variant
    mask_BT = sig.valid_BT.clone()
    if uneven:
        mask_BT[-1] = False
    half = mask_BT.shape[0] // world
    mask_BT[: rank * half] = False
    mask_BT[(rank + 1) * half:] = False
    if uneven and world > 1:
        seqs = rollouts.sequences()
        cut = [len(seqs[b][0]) + int(mask_BT[b].nonzero().max()) + 1 for b in range(len(seqs)) if mask_BT[b].any()]
        tr.args.max_tokens_per_microbatch = max(cut)
        n = len(update.micro_batches(seqs, mask_BT, max(cut)))
        (Path(out) / f"mbs{rank}.json").write_text(json.dumps(n))
    train.update_step(tr, rollouts, scores, mask_BT, step=1)
    if world > 1:
        state, _ = distributed.full_states(tr.student, tr.optimizer)
        dist.destroy_process_group()
    else:
        state = tr.student.state_dict()
    if rank == 0:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, f"{out}/world{world}.pt")


@pytest.mark.parametrize("sharding, uneven", [("fsdp", False), ("fsdp", True), ("ddp", True)])
def test_fsdp_update_on_two_ranks_equals_one_process(tiny_world, tmp_path, sharding, uneven):
    """uneven: rank 0 runs 2 micro-batches, rank 1 one; FSDP's per-forward all-gathers then pair up only
    if rank 1 runs a zero-weight micro-batch too (without it the step timed out in a reduce-scatter); DDP
    needs none (one all-reduce per rank, in its last backward)."""
    import torch.multiprocessing as mp

    common = ["--method", "full", "--samples", "2", "--prompts-per-step", "2"]
    _one_update(0, 1, 0, _argv(tiny_world, tmp_path / "one", *common), str(tmp_path), uneven)
    mp.start_processes(_one_update, args=(2, _free_port(), _argv(tiny_world, tmp_path / "two", *common, "--sharding",
                                                                  sharding), str(tmp_path), uneven),
                       nprocs=2, start_method="spawn", join=True)
    if uneven:
        assert [json.loads((tmp_path / f"mbs{r}.json").read_text()) for r in (0, 1)] == [2, 1]
    one, two = (torch.load(tmp_path / f"world{w}.pt", weights_only=True) for w in (1, 2))
    before = load_file(str(tiny_world["student"] / "model.safetensors"))
    assert set(before) <= set(two) <= set(one)  # FSDP's full state leaves out the tied LM head copy
    moved = max(float((one[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-4  # the step did change the weights (lr 1e-3): the comparison below is not vacuous
    worst = max(float((one[k] - two[k]).abs().max()) for k in two)
    assert worst <= ATOL, f"{sharding} weights differ from one process's by {worst:.2e}"


def test_fsdp_without_torchrun_is_refused(tiny_world, tmp_path):
    args = train.parse_args(_argv(tiny_world, tmp_path, "--method", "full", "--sharding", "fsdp"))
    with pytest.raises(ValueError, match=r"--sharding fsdp \(train.sharding: fsdp\) needs torchrun"):
        train.check_args(args, world=1)
    train.check_args(args, world=2)
    with pytest.raises(ValueError, match="--sharding: 'zero3' is not allowed; allowed values: 'ddp', 'fsdp'"):
        train.check_args(train.parse_args(_argv(tiny_world, tmp_path, "--method", "full", "--sharding", "zero3")))


def _torchrun(tiny_world, out, port, *extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={port}", "-m", "opd.engines.train",
            *_argv(tiny_world, out, "--method", "ta_opd", "--ratio", "0.3", "--steps", "4", "--checkpoint-every", "1",
                   "--warmup-steps", "3", "--max-new-tokens", "48", "--sharding", "fsdp", *extra)]


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", OMP_NUM_THREADS="1")
    return env


def _kill_group_when(proc: subprocess.Popen, done, timeout: float = 400.0) -> None:
    """SIGKILL torchrun and its ranks (one process group) as soon as `done` (a checkpoint dir) is complete."""
    deadline = time.monotonic() + timeout
    while not (done / "state.json").is_file():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {done.name} was complete"
        assert time.monotonic() < deadline, f"no complete {done.name} after {timeout:.0f} s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_fsdp_sigkilled_run_resumes_and_replays_exactly(tiny_world, tmp_path):
    """torchrun with --sharding fsdp, SIGKILLed (every process) after step 2's checkpoint, then rerun: the final
    weights and metrics are those of an uninterrupted run, and the checkpoints hold the full (unsharded) state."""
    env = _env(tmp_path)
    a = subprocess.run(_torchrun(tiny_world, tmp_path / "A", _free_port(), "--name", "A"), env=env,
                       capture_output=True, text=True, timeout=600)
    assert a.returncode == 0, a.stderr[-4000:]
    cmd = _torchrun(tiny_world, tmp_path / "B", _free_port(), "--name", "B")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_group_when(proc, tmp_path / "B" / "checkpoints" / "step_000002")
    assert not (tmp_path / "B" / "metrics.json").exists()
    ckpt = train.load_latest_checkpoint(tmp_path / "B")
    assert ckpt["step"] in (2, 3)
    student = load_file(str(tiny_world["student"] / "model.safetensors"))
    assert all(ckpt["model"][k].shape == t.shape for k, t in student.items())  # full tensors, not shards
    cmd[cmd.index(next(c for c in cmd if c.startswith("--master_port")))] = f"--master_port={_free_port()}"
    b = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-4000:]

    metrics_a, metrics_b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in "AB")
    for m in (metrics_a, metrics_b):
        m.pop("tokens_per_second")
    assert metrics_a == metrics_b and metrics_a["step"] == 4
    wa, wb = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in "AB")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in (tmp_path / "B" / "checkpoints").iterdir()) == ["step_000004"]
