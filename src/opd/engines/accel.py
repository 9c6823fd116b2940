"""Where the trainer's tensors live and in which precision it computes (`--device`, `--dtype`).

Precision policy for `--dtype bfloat16`: the student keeps float32 master weights and AdamW state, and
its forward passes (rollouts, scoring, the update) run under `torch.autocast(bfloat16)`. Pure bf16
weights would lose the update itself: bf16 keeps 8 mantissa bits, so a weight of 0.02 moves only in
steps of about 1e-4, and the papers' lr of 1e-6 times an Adam step of order 1 rounds to no change at
all. The teacher gets no updates, so it is loaded in bf16 (half the memory, same autocast matmuls).
`--dtype float32` is the CPU default and leaves every number as before (no autocast at all).

Under torchrun with CUDA, rank r uses cuda:LOCAL_RANK and a process group with two backends
("cpu:gloo,cuda:nccl"): DDP's gradient all-reduce on CUDA tensors goes through nccl, while the small
CPU tensors of `opd.engines.distributed` (loss scale, metrics, resume step) keep going through gloo.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist

from opd.engines import distributed

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where models, rollouts, scoring and the update run; auto = cuda when available")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="bfloat16: fp32 master weights + bf16 autocast for the student, a bf16 teacher "
                             "(use on GPUs); float32: everything in fp32")


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """cpu, or cuda:LOCAL_RANK (torchrun sets LOCAL_RANK; a single process gets cuda:0)."""
    if name not in DEVICES:
        raise ValueError(f"unknown --device {name!r}; allowed: {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device (a CPU build of torch, or no GPU)")
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    return torch.device("cuda", rank)


def autocast(device: torch.device, dtype: str):
    """bf16 autocast for `--dtype bfloat16`; no context at all for float32 (bit-identical to before)."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def teacher_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


@contextlib.contextmanager
def session(device_name: str):
    """(distributed.Context, device) for this process; the process group destroyed on the way out."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            if world > 1 and not dist.is_initialized():
                dist.init_process_group("cpu:gloo,cuda:nccl")
        yield distributed.init(device), device
    finally:
        distributed.shutdown()


def to_cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU, so a checkpoint loads on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def cpu_state(obj) -> dict:
    """`obj.state_dict()` with every tensor on the CPU (checkpoints load on a machine without a GPU)."""
    return to_cpu(obj.state_dict())
