"""Data-parallel training under torchrun (2 CPU ranks, gloo) and the per-rank split of each step."""

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from opd.engines import checkpoint, distributed
from opd.engines import train

SMALL = ["--top-k", "4", "--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "12",
         "--threads", "1", "--lr", "1e-3", "--study", "test_distributed"]


def _argv(world, out, *extra) -> list[str]:
    return ["--student", str(world["student"]), "--teacher", str(world["teacher"]),
            "--world", "miniature", "--prompts", str(world["prompts"]), "--out-dir", str(out), *SMALL, *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prompts_per_step_must_split_evenly_over_the_ranks(tiny_world, tmp_path):
    args = train.parse_args(_argv(tiny_world, tmp_path, "--method", "full", "--prompts-per-step", "3"))
    train.check_args(args)  # one process: any count
    with pytest.raises(ValueError, match="--prompts-per-step 3 is not divisible by the 2 ranks"):
        train.check_args(args, world=2)


def test_ranks_take_disjoint_shares_of_the_same_draw_and_sample_with_their_own_seeds(tiny_world, tmp_path,
                                                                                      monkeypatch):
    args = train.parse_args(_argv(tiny_world, tmp_path, "--method", "full", "--prompts-per-step", "4",
                                  "--samples", "1", "--seed", "5"))
    tr = train.setup(args)  # no process group: sample() needs only the rank and the world size
    seeds, real = [], train.generate_hf
    monkeypatch.setattr(train, "generate_hf", lambda *a, seed, **kw: seeds.append(seed) or real(*a, seed=seed, **kw))
    whole = train.sample(tr, t=3)[0]
    parts = [train.sample(train.dataclasses.replace(tr, dist=distributed.Context(r, 2)), t=3)[0] for r in range(2)]
    assert parts[0].ids + parts[1].ids == whole.ids and not set(parts[0].ids) & set(parts[1].ids)
    base = 5 * distributed.STEP_SEED + 3
    assert seeds == [base, base, base + distributed.RANK_SEED]  # rank 0 samples as one process does
    # rank 0's rollouts are those of the single process on its share
    assert torch.equal(parts[0].tensors["tokens_N"], train.sample(
        with_flags(tr, prompts_per_step=2), t=3)[0].tensors["tokens_N"])


def with_flags(tr: train.Trainer, **flags) -> train.Trainer:
    return train.dataclasses.replace(tr, args=argparse.Namespace(**{**vars(tr.args), **flags}))


@pytest.mark.slow
def test_torchrun_two_ranks_train_one_model_and_log_one_run(tiny_world, tmp_path):
    out, sums = tmp_path / "out", tmp_path / "checksums"
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", OPD_DEBUG_CHECKSUM_DIR=str(sums),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "opd.engines.train",
           *_argv(tiny_world, out, "--method", "ta_opd", "--ratio", "0.3", "--steps", "2", "--name", "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    metrics = json.loads((out / "metrics.json").read_text())
    signals = metrics.pop("signals")  # the resolved paper/official settings (opd.math.variant)
    assert signals["variant"] == "paper" and signals["aggregation"] == "token_mean"
    assert metrics.pop("optimizer")["train.optimizer.name"] == "adamw"  # the resolved optimizer (opd.engines.optim)
    assert metrics["step"] == 2 and all(isinstance(v, (int, float)) for v in metrics.values())
    assert (out / "model" / "model.safetensors").is_file()
    assert [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")] == ["step_000002"]
    assert proc.stdout.count('"step": 2') == 1  # only rank 0 prints the final metrics

    rank0, rank1 = (json.loads((sums / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1  # DDP kept the two replicas identical
    ckpt = train.load_latest_checkpoint(out)  # rank 0's final weights, written by rank 0 alone
    assert sum(float(t.double().sum()) for t in ckpt["model"].values()) == pytest.approx(rank0["sum"], abs=1e-9)
    from safetensors.torch import load_file

    saved = load_file(str(out / "model" / "model.safetensors"))  # without the tied lm_head copy
    assert saved and all(torch.equal(t, ckpt["model"][k]) for k, t in saved.items())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("test_distributed")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == ckpt["run_id"]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2]


def _nan_on_rank_one(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: only rank 1 has a problem; both must raise, neither may hang."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = distributed.Context(rank, 2)
    try:
        distributed.raise_if_any(ctx, None, "at step 1")  # nobody has a problem: nobody raises
        distributed.raise_if_any(ctx, "non-finite student logits" if rank == 1 else None, "at step 2")
        result = "no error"
    except FloatingPointError as err:
        result = str(err)
    finally:
        dist.destroy_process_group()
    with open(f"{out}/rank{rank}.txt", "w") as fh:
        fh.write(result)


def test_a_problem_on_one_rank_stops_every_rank(tmp_path):
    """Non-finite values on one rank stop all ranks at the same step (one alone would hang the others)."""
    import torch.multiprocessing as mp

    mp.start_processes(_nan_on_rank_one, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn",
                       join=True)
    assert (tmp_path / "rank1.txt").read_text() == "non-finite student logits at step 2 (1 of 2 ranks)"
    assert (tmp_path / "rank0.txt").read_text() == "non-finite values on another rank at step 2 (1 of 2 ranks)"
    with pytest.raises(FloatingPointError, match="^non-finite OPD loss at step 3$"):  # one process: no collective
        distributed.raise_if_any(distributed.Context(), "non-finite OPD loss", "at step 3")
