"""One-step-off-policy rollouts (`--async-rollouts 1`, config `train.async_rollouts`): sampling overlaps the update.

With 0 (the default) step t samples from the weights it then updates. With 1, at the start of step t the
rollouts of step t + 1 are launched in a background thread, from a snapshot of the weights at that moment
(those after t − 1 updates), while step t's teacher scoring and update run in the main thread; step t + 1
then trains on them, after one more update: staleness 1 (logged per step as `rollout_staleness`). Step 1,
and the first step after a resume whose checkpoint holds no pending rollouts, is sampled synchronously
(staleness 0). "Sampling" is everything `opd.engines.train.sample` does: prompt draw, generation and, with
`--recompute-rollout-logprobs`, the recompute, all with the snapshot's weights.

- `hf` backend: a second copy of the student (the snapshot; fp32 like the student, so twice its weights in
  memory) gets the weights by `load_state_dict` before each launch and samples in the thread.
- `vllm` backend: the engine already lives in another process. The new weights are pushed from the main
  thread (the shared-memory push has a barrier under DDP: collectives stay in the main thread) only once
  the engine's pending `generate` has returned, so no rollouts ever come from weights other than the
  snapshot's; the thread then only waits for `generate` (and runs the recompute on the snapshot copy).

Deterministic: the thread samples with its own seeded generators (`opd.engines.rollout.SeededSampler`;
nothing draws from the global RNG), so rollouts depend on (seed, step, rank, snapshot), never on thread
timing. With `--threads 1` the two threads keep 2 cores busy (torch releases the GIL inside its ops).

Exact resume: checkpoint c waits for the pending rollouts of step c + 1 and stores them in the checkpoint
directory (pending_rollouts.rank{r}.safetensors: the tensors, the drawn record indices and the sampling's engine
metrics), through the checkpoint's atomic writer; a resume takes them up, so it replays an uninterrupted
run exactly. Under DDP each rank samples its own share in its own thread (no collective in the thread);
under `sharding: fsdp` (the replica is refreshed by a collective) it is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from opd.engines import distributed
from opd.engines.rollout import Rollouts

PENDING = "pending_rollouts.rank{rank}.safetensors"  # in a checkpoint directory (its sizes in state.json)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--async-rollouts", type=int, default=0,
                        help="1: step t+1's rollouts are sampled while step t scores and updates, from the weights "
                             "at the start of step t (one-step-off-policy, staleness 1); 0: on-policy")


def check_args(args: argparse.Namespace) -> None:
    """Refuse what the overlap cannot do, before anything loads."""
    if args.async_rollouts and args.sharding == "fsdp":
        raise ValueError("--async-rollouts 1 (train.async_rollouts) does not work with --sharding fsdp "
                         "(train.sharding): the FSDP replica is refreshed by a collective; use ddp or async_rollouts 0")


@dataclasses.dataclass
class Pending:
    step: int
    future: Future  # -> (rollouts, drawn record indices, the sampling's engine metrics)


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


class RolloutsAhead:
    """The trainer's rollouts one step ahead: `rollouts_for(t)` at the start of each step, `stage(t)` at
    each checkpoint, `close()` at the end (waits for the thread)."""

    def __init__(self, tr, sample: Callable):
        self.tr, self.sample = tr, sample  # `opd.engines.train.sample`
        args = tr.args
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="opd-rollouts", initializer=torch.set_num_threads,
                                       initargs=(args.threads,))  # torch's thread count is per thread
        need_copy = args.rollout_backend == "hf" or args.recompute_rollout_logprobs
        self.snapshot = copy.deepcopy(tr.student).requires_grad_(False) if need_copy else None
        self.index_of = {id(r): i for i, r in enumerate(tr.records)}  # the drawn records, by identity
        self.pending: Pending | None = None

    def _sample(self, view, t: int):
        rollouts, records = self.sample(view, t)
        return rollouts, [self.index_of[id(r)] for r in records], view.engine_metrics

    def rollouts_for(self, t: int) -> tuple[Rollouts, list[dict]]:
        """Step t's rollouts and records (pending, or sampled now), after launching step t + 1's."""
        tr = self.tr
        if self.pending is not None and self.pending.step != t:  # never: the loop runs steps in order
            raise RuntimeError(f"step {t} asked for rollouts while those of step {self.pending.step} are pending")
        if self.pending is not None:
            (rollouts, index, metrics), staleness = self.pending.future.result(), 1
        else:  # from the weights about to be updated (the thread is idle)
            tr.engine_metrics = {}
            (rollouts, index, metrics), staleness = self._sample(tr, t), 0
        self.pending = None
        if t < tr.args.steps:
            self._launch(t + 1)
        tr.engine_metrics = {**metrics, "rollout_staleness": float(staleness)}
        return rollouts, [tr.records[i] for i in index]

    def _launch(self, t: int) -> None:
        """Step t's sampling in the thread, from the current weights (those of the start of step t − 1)."""
        tr = self.tr
        view = dataclasses.replace(tr, engine_metrics={}, ddp=None)
        if self.snapshot is not None:
            self.snapshot.load_state_dict(tr.student.state_dict())
            view.student = self.snapshot
        if tr.engine is not None:  # the engine's previous generate has returned: safe to replace its weights
            view.engine_metrics = tr.engine.push_weights(tr.student, version=t)
            view.rollout_weights_stale = False
        self.pending = Pending(t, self.pool.submit(self._sample, view, t))

    def stage(self, t: int, staging: Path) -> bool:
        """Every rank, at checkpoint t: wait for step t + 1's rollouts and write this rank's file under
        `staging`; False when none are pending (the last step)."""
        if self.pending is None:
            return False
        rollouts, index, metrics = self.pending.future.result()
        meta = {"step": self.pending.step, "index": index, "engine_metrics": metrics}
        path = staging / PENDING.format(rank=self.tr.dist.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        Rollouts(rollouts.ids, rollouts.tensors, meta).save(path)
        return True

    def resume(self, ckpt: dict | None) -> None:
        """Take up the pending rollouts a checkpoint holds for its next step (if any)."""
        path = None if ckpt is None else Path(ckpt["path"]) / PENDING.format(rank=self.tr.dist.rank)
        if path is None or not path.is_file():
            return
        loaded = Rollouts.load(path)
        meta = loaded.meta
        if meta["step"] != ckpt["step"] + 1:
            raise ValueError(f"{path} holds the rollouts of step {meta['step']}, not of step {ckpt['step'] + 1}")
        rollouts = Rollouts(loaded.ids, loaded.tensors)
        self.pending = Pending(meta["step"], _done((rollouts, meta["index"], meta["engine_metrics"])))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def staging_dir(out_dir: Path, t: int) -> Path:
    return out_dir / "checkpoints" / f".pending_step_{t:06d}"


def stage_pending(tr, t: int) -> Callable[[Path], None] | None:
    """Checkpoint t's hook (every rank): the pending rollouts staged, and the function rank 0's
    `save_checkpoint` calls to move them into the checkpoint's temporary directory; None without any."""
    if tr.ahead is None:
        return None
    staging = staging_dir(tr.args.out_dir, t)
    staged = tr.ahead.stage(t, staging)
    distributed.barrier(tr.dist)  # every rank's file is written before rank 0 moves them
    if not staged:
        return None

    def move(tmp: Path) -> None:  # into the checkpoint's temporary directory, renamed when complete
        for path in sorted(staging.iterdir()):
            path.rename(tmp / path.name)
        staging.rmdir()
    return move


@contextlib.contextmanager
def for_trainer(tr, sample: Callable, ckpt: dict | None):
    """With --async-rollouts 1: a RolloutsAhead as `tr.ahead` (resumed from `ckpt`) while the block runs."""
    if not tr.args.async_rollouts:
        yield None
        return
    if tr.dist.main:  # what a run killed between staging and checkpointing left (before any rank stages again)
        for old in (tr.args.out_dir / "checkpoints").glob(".pending_step_*"):
            shutil.rmtree(old, ignore_errors=True)
    ahead = RolloutsAhead(tr, sample)
    ahead.resume(ckpt)
    tr.ahead = ahead
    try:
        yield ahead
    finally:
        tr.ahead = None
        ahead.close()
