"""Data-parallel OPD under torchrun: torch's DistributedDataParallel over a thin student wrapper.

`torchrun --nproc_per_node=N -m opd.engines.train ...` starts N ranks (gloo on CPU; on GPUs each rank uses
cuda:LOCAL_RANK and gradients go through nccl, see opd.engines.accel). Each holds the full student and teacher, draws the same global prompts for step t and keeps its
own disjoint share: prompts [r·P/N, (r+1)·P/N) of the draw (P = --prompts-per-step, divisible by N).
Rollouts, teacher scores and masks stay local: rank r samples with seed + t + r·RANK_SEED and the
random selector uses its step seed + r·RANK_SEED (rank 0 = the single-process run), and selectors
rank and budget (ρ, Norm() quantiles) within the rank's share, not the global batch.

The update's forward runs through a DDP-wrapped `MaskedLogits`, so backward averages the gradients;
the local loss is scaled (`loss_scale`) so that this average is exactly the gradient of the
global-batch loss. Metrics are all-reduced (`reduce_metrics`) so rank 0 logs global numbers. Rank 0
alone writes MLflow, checkpoints, the model and metrics.json, with a barrier after each checkpoint;
every rank resumes from the same checkpoint (a shared disk). Checkpoints hold rank 0's RNG states:
every step reseeds what it samples, so a resumed distributed run replays too.
Without WORLD_SIZE > 1 nothing here is used.

`--sharding fsdp` (train.sharding) replaces DDP by FSDP2 (`torch.distributed.fsdp.fully_shard`): every
decoder layer and the root (embeddings, final norm, LM head) are sharded over the ranks, so each holds 1/N
of the fp32 master weights, gradients and AdamW state. Mixed precision follows opd.engines.accel: with
--dtype bfloat16 the all-gathered compute weights are bf16 and gradients are reduced in fp32
(MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)); with float32 nothing is cast. Rollouts and the
exact-signal student pass run on a full, unsharded replica of the student (`refresh_replica` after each
update): hf `generate` runs a different number of decode steps on each rank, and a sharded model would need
every rank in each step's all-gathers. Checkpoints gather the full state on rank 0 (`full_states`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from opd.engines.forward import supervised_map

CHECKSUM_ENV = "OPD_DEBUG_CHECKSUM_DIR"  # tests: every rank writes a digest of its final weights there
RANK_SEED = 2**32  # rank r samples and selects with seeds offset by r·RANK_SEED: no other step's seed
STEP_SEED = 1_000_003  # seeds of step t are seed·STEP_SEED + t: different run seeds never share a stream


def step_seed(seed: int, t: int, rank: int = 0) -> int:
    """The seed of step t of a run (on one rank): a pure function of (seed, t, rank), so a resumed run
    replays an uninterrupted one exactly. Prompt draws use rank 0's (every rank draws the same prompts)."""
    return seed * STEP_SEED + t + rank * RANK_SEED


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def backend(device: torch.device) -> str:
    """nccl for CUDA tensors, gloo for CPU ones (the in-process loop keeps its models on the CPU).

    On CUDA both: the ranks' small agreements (`raise_if_any`, `loss_scale`, `max_over_ranks`) reduce CPU
    tensors, which NCCL refuses; torch routes each collective by its tensor's device. Not yet run on a GPU.
    """
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def init(device: torch.device = torch.device("cpu")) -> Context:
    """Join the torchrun process group when WORLD_SIZE > 1 (env:// rendezvous); else a 1-rank context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group(backend(device))
    return Context(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def raise_if_any(ctx: Context, problem: str | None, where: str) -> None:
    """FloatingPointError on every rank when any rank has a `problem` (e.g. non-finite logits).

    One rank raising alone would leave the others blocked in their next collective (DDP's gradient
    all-reduce) until the backend's timeout: on a cluster, a hung job instead of a failed one. So the
    ranks agree first (one small all-reduce per step) and then all stop, naming the step.
    """
    if ctx.world == 1:
        if problem:
            raise FloatingPointError(f"{problem} {where}")
        return
    flag = torch.tensor([float(problem is not None)])
    dist.all_reduce(flag)
    if flag.item() > 0:
        raise FloatingPointError(f"{problem or 'non-finite values on another rank'} {where} "
                                 f"({int(flag.item())} of {ctx.world} ranks)")


def max_over_ranks(ctx: Context, n: int) -> int:
    """The largest `n` over the ranks (every rank calls it at the same point)."""
    if ctx.world == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def check_share(prompts_per_step: int, world: int) -> None:
    if prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {prompts_per_step} is not divisible by the {world} ranks "
                         f"(WORLD_SIZE): each rank takes an equal share of every step's prompts")


def share(ctx: Context, items: list) -> list:
    """Rank r's part of a list drawn identically on every rank: items [r·n/world, (r+1)·n/world)."""
    n = len(items) // ctx.world
    return items[ctx.rank * n: (ctx.rank + 1) * n]


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()


class MaskedLogits(torch.nn.Module):
    """The update's chunked LM-head reductions at the kept response positions (`opd.engines.forward.supervised_map`),
    as a module DDP wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prompts: list[list[int]], responses: list[list[int]], keep_N: Tensor, fn, per_pos, chunk: int):
        return supervised_map(self.model, prompts, responses, keep_N, fn, per_pos, chunk)


SHARDINGS = ("ddp", "fsdp")


def check_sharding(sharding: str, world: int) -> None:
    if sharding not in SHARDINGS:
        raise ValueError(f"unknown --sharding {sharding!r} (train.sharding); allowed: {', '.join(SHARDINGS)}")
    if sharding == "fsdp" and world <= 1:
        raise ValueError("--sharding fsdp (train.sharding: fsdp) needs torchrun with WORLD_SIZE > 1 "
                         "(resources.train.gpu > 1); one process has nothing to shard over: use ddp")


def wrap_fsdp(student, dtype: str) -> MaskedLogits:
    """FSDP2 over each decoder layer and a root `MaskedLogits` (embeddings, norm, tied LM head stay together).

    The root is the module the update calls, so its forward hook all-gathers the root's parameters;
    the layers all-gather one at a time inside the trunk.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if dtype == "bfloat16" else MixedPrecisionPolicy())
    for layer in student.model.layers:
        fully_shard(layer, mp_policy=policy)
    root = MaskedLogits(student)
    fully_shard(root, mp_policy=policy)
    return root


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_states(student, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts of an FSDP student as CPU tensors on rank 0 ({} on the others).

    A collective: every rank calls it. The optimizer's state is keyed by parameter name, not index.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _state_options(cpu_offload=True)
    return (get_model_state_dict(student, options=options),
            get_optimizer_state_dict(student, optimizer, options=options))


def load_states(student, optimizer, model_state: dict, optimizer_state: dict, sharded: bool) -> None:
    """Put full (model, optimizer) state dicts, read by every rank, in place; sharded, each rank keeps its shard."""
    if not sharded:
        student.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(student, model_state, options=_state_options())
    set_optimizer_state_dict(student, optimizer, optimizer_state, options=_state_options())


def wrap_student(student, ctx: Context, sharding: str, dtype: str, load_replica) -> tuple:
    """(the module the update calls, the unsharded replica or None): nothing on one rank; DDP; or FSDP2 and
    `load_replica()` moved to the student's device. Before the optimizer is built: FSDP replaces parameters."""
    if ctx.world == 1:
        return None, None
    if sharding != "fsdp":
        return wrap(student), None
    replica = load_replica().to(student.device).requires_grad_(False)
    return wrap_fsdp(student, dtype), replica


def refresh_replica(student, replica) -> None:
    """Copy the FSDP student's current weights into its unsharded replica on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(student, options=_state_options())
    missing, unexpected = replica.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # a tied LM head is not a separate key
        raise RuntimeError(f"the student replica does not match the sharded student: missing {missing}, "
                           f"unexpected {unexpected}")


def wrap(student) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over the student's forward; it broadcasts rank 0's weights once, here.

    Buffers (rotary frequencies) are constants: synced at construction, not at every forward.
    """
    return torch.nn.parallel.DistributedDataParallel(MaskedLogits(student), forward_sync_buffers=False)


def loss_scale(ctx: Context, mask_BT: Tensor, aggregation: str, what: str) -> float:
    """Factor on a rank's loss so that DDP's gradient average is the gradient of the global-batch loss.

    1 on a single rank (a ValueError if its mask is empty: the check the single-process loop always did).

    A rank's loss is a mean over its `units`: supervised tokens (token_mean) or sequences with a
    supervised token (sequence_mean). The global-batch loss is Σ_r units_r·loss_r / Σ_r units_r and DDP
    divides the summed gradients by the world size, so rank r's loss is scaled by world·units_r / Σ units
    (unscaled, each rank's mean would weigh the same whatever its token count). Every rank raises the
    same ValueError when some rank has nothing to supervise, instead of leaving the others waiting.
    """
    if ctx.world == 1:
        if not bool(mask_BT.any()):
            raise ValueError(f"{what} supervises no token")
        return 1.0
    units = int(mask_BT.sum()) if aggregation == "token_mean" else int(mask_BT.any(-1).sum())
    counts = torch.tensor([float(units), float(units == 0)], dtype=torch.float64)
    dist.all_reduce(counts)
    if counts[1] > 0:
        raise ValueError(f"{what} supervises no token on {int(counts[1])} of {ctx.world} ranks")
    return ctx.world * units / float(counts[0])


def reduce_metrics(ctx: Context, metrics: dict[str, float]) -> dict[str, float]:
    """Mean over ranks (each rank weighted equally), except tokens_per_second: summed, the job's throughput.

    The loss, scaled by `loss_scale`, averages to the global-batch loss; the other token means
    (reverse KL, frac_supervised) are means of per-rank means.
    """
    if ctx.world == 1:
        return metrics
    keys = list(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) if k == "tokens_per_second" else float(v) / ctx.world for k, v in zip(keys, values.tolist())}


def check_same_step(ctx: Context, step: int, out_dir: Path) -> None:
    """Every rank resumes from the same checkpoint step, or every rank raises."""
    if ctx.world == 1:
        return
    lo_hi = torch.tensor([-step, step], dtype=torch.float64)
    dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX)
    if -float(lo_hi[0]) != float(lo_hi[1]):
        raise RuntimeError(f"ranks resume {out_dir} from different steps ({-int(lo_hi[0])} to {int(lo_hi[1])}): "
                           f"is it on a disk every rank sees?")


@dataclasses.dataclass
class NoRun:
    """The tracking run of ranks other than 0: logs nothing."""
    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        pass


def main_only(ctx: Context, open_run):
    """`open_run()` (an MLflow run context) on rank 0; a NoRun elsewhere."""
    return open_run() if ctx.main else contextlib.nullcontext(NoRun())


def finish(ctx: Context, model) -> None:
    """After training: the debug checksum of every rank, then wait until rank 0 has written its outputs."""
    dump_checksum(ctx, model)
    barrier(ctx)


def dump_checksum(ctx: Context, model) -> None:
    """With OPD_DEBUG_CHECKSUM_DIR set: rank{r}.json with the sum and a SHA-256 of the rank's weights."""
    out = os.environ.get(CHECKSUM_ENV)
    if not out:
        return
    digest, total = hashlib.sha256(), 0.0
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        total += float(p.detach().double().sum())
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{ctx.rank}.json").write_text(json.dumps({"sum": total, "sha256": digest.hexdigest()}))
