"""The trainer's side of the persistent vLLM rollout engine (`--rollout-backend vllm`).

vLLM cannot be imported next to the trainer's CPU torch stack, so the engine lives in a worker process
(`python -m opd.engines.vllm_worker`, started with `--vllm-python`) that stays up for the whole run and speaks
the JSON-lines protocol of `opd.engines.worker_proc`. Each step's rollouts come from the current student:
after an optimizer step the weights go to one safetensors file and every engine reloads them in place
(vLLM's `reload_weights` through `collective_rpc`; no engine restart). Rollouts come back as a safetensors
file with the tensors of `opd.rollout.generate_hf`.

Weight push (`--vllm-weight-push`):
- `shm` (default): ONE copy per node in shared memory (/dev/shm/opd-weights-USER-HASH@HOST:PID/, HASH of
  the run directory, PID that of the node's local rank 0, its writer and owner), written by local rank 0 only; after a barrier every local engine reads it. Under DDP every
  rank holds the same weights after a step, so one copy serves them all. The file carries the step it
  belongs to in its metadata, and the worker refuses a file of another step (stale or partial: one
  clear error, never rollouts from old weights).
- `per_rank`: each rank writes its own copy under OUT/rollout_weights/rank{r}/ (the old behaviour, on
  whatever disk the run directory is on).
Each push returns its time and bytes (logged per step as `push_seconds`, `push_bytes`). The writer removes the
copy on exit and on an exception; a job killed outright (SIGKILL) cannot, so the next engine (or teacher
worker) started on the node removes every /dev/shm/opd-*@HOST:PID directory of this user whose PID is no
live process (`remove_stale_copies`; never one of a live process).

On CUDA, `--vllm-sleep` puts the engine to sleep (vLLM sleep mode, level 1: weights offloaded to CPU RAM,
KV cache released) after each step's rollouts and wakes it before the next push, so the update gets the
GPU memory back; CUDA graphs are on by default on GPUs (`--vllm-enforce-eager auto`). Neither has run
on a GPU yet (docs/training.md). The CPU build keeps enforce_eager and refuses sleep mode.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import os
import re
import shutil
import socket
import sys
import warnings
import time
from pathlib import Path

import torch
from torch import Tensor

import opd
from opd.engines import distributed
from opd.engines.vllm_worker import VERSION_KEY
from opd.engines.worker_proc import WorkerProcess
from opd.infra.io import atomic_path

VLLM_PYTHON_ENV = "OPD_VLLM_PYTHON"
BACKENDS = ("hf", "vllm")
PUSH_MODES = ("shm", "per_rank")
SHM_ROOT = Path("/dev/shm")
OWNED_RE = re.compile(r"opd-.*@(?P<host>[^@:/]+):(?P<pid>\d+)(?:-[^@/]*)?")  # what `owner_tag` names, + mkdtemp's


def _tristate(value: str) -> str | bool:
    """auto, or a boolean (as config `train.vllm_enforce_eager` holds it)."""
    value = str(value).lower()
    if value not in ("auto", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")
    return value if value == "auto" else value == "true"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rollout-backend", choices=BACKENDS, default="hf",
                        help="hf: transformers generate() in the trainer; vllm: a persistent vLLM engine "
                             "in a worker process, updated in place with the student's weights every step")
    parser.add_argument("--vllm-python", default=None,
                        help=f"python of the environment that has vLLM (default: ${VLLM_PYTHON_ENV}, "
                             f"else this python)")
    parser.add_argument("--vllm-memory-fraction", type=float, default=0.3,
                        help="vLLM gpu_memory_utilization: the engine's share of the GPU it shares with the "
                             "trainer (CPU build: share of host RAM for its KV cache)")
    parser.add_argument("--vllm-weight-push", choices=PUSH_MODES, default="shm",
                        help="shm: one weights file per node in /dev/shm, written by local rank 0; "
                             "per_rank: one file per rank in the run directory")
    parser.add_argument("--vllm-sleep", action="store_true",
                        help="CUDA only: vLLM sleep mode (level 1) between rollouts and the next push")
    parser.add_argument("--vllm-enforce-eager", type=_tristate, default="auto",
                        help="auto: eager on CPU, CUDA graphs on GPUs; true/false force it")
    parser.add_argument("--recompute-rollout-logprobs", action="store_true",
                        help="the rollouts' log p_S and top-K from the trainer's forward (opd.engines.recompute); "
                             "the engine returns only token ids and, for a mismatch diagnostic, their logprobs")


def check_args(args: argparse.Namespace, device: torch.device | None = None) -> None:
    """Refuse sleep mode where vLLM has none (the CPU build): before the engine starts."""
    if args.rollout_backend == "vllm" and args.vllm_sleep and (
            args.device == "cpu" or (device is not None and device.type != "cuda")):
        where = device.type if device is not None else args.device
        raise ValueError(f"--vllm-sleep (train.vllm_sleep) needs CUDA: vLLM's sleep mode exists only on CUDA "
                         f"builds, and this run's device is {where}")


def enforce_eager(flag: str | bool, device: torch.device) -> bool:
    return device.type != "cuda" if flag == "auto" else bool(flag)


def vllm_python(flag: str | None) -> str:
    return flag or os.environ.get(VLLM_PYTHON_ENV) or sys.executable


def worker_env(device: torch.device) -> dict[str, str]:
    """This environment, plus our package on PYTHONPATH and (on CUDA) only the trainer's GPU visible."""
    env = dict(os.environ)
    src = str(Path(opd.__file__).resolve().parents[1])  # the vLLM environment does not install opd
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    if device.type == "cuda":
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        index = device.index or 0
        env["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    return env


def write_weights(model, directory: Path, dtype: torch.dtype, version: int | None = None) -> Path:
    """The model's weights as directory/model.safetensors, renamed into place (never seen half-written).

    A tied LM head shares its tensor with the embedding and is written once, as in the model's own
    checkpoint; vLLM ties it again. The temporary name does not end in .safetensors, so a reload never
    picks it up. `version` (the step) goes into the metadata, for the reader to check.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().to("cpu", dtype).contiguous()
    final = directory / "model.safetensors"
    meta = {"format": "pt", **({VERSION_KEY: str(version)} if version is not None else {})}
    with atomic_path(final) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return final


def owner_tag(pid: int | None = None) -> str:
    """@HOST:PID, the owner a shared-memory directory's name carries (`remove_stale_copies` reads it)."""
    return f"@{socket.gethostname()}:{pid if pid is not None else os.getpid()}"


def shm_weights_dir(out_dir: Path, owner_pid: int | None = None) -> Path:
    """This run's node-local weights directory in shared memory (one per run directory, user and owner:
    the node's local rank 0, by default this process)."""
    digest = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]
    return SHM_ROOT / f"opd-weights-{getpass.getuser()}-{digest}{owner_tag(owner_pid)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_copies(root: Path = SHM_ROOT) -> list[Path]:
    """Delete this user's opd-*@HOST:PID directories of this host under `root` whose PID is dead (what a
    SIGKILLed job leaves); a live owner's (or a reused PID's) stay. Returns those removed, with a warning."""
    host, removed = socket.gethostname(), []
    for path in sorted(root.glob("opd-*@*")) if root.is_dir() else []:
        m = OWNED_RE.fullmatch(path.name)
        if m is None or m["host"] != host or not path.is_dir() or path.stat().st_uid != os.getuid():
            continue
        if not _alive(int(m["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        warnings.warn(f"removed {len(removed)} shared-memory copies left by dead jobs: "
                      f"{', '.join(map(str, removed))}", stacklevel=2)
    return removed


def node_writer_pid(ctx: distributed.Context) -> int:
    """The pid of this node's local rank 0 (the shared copy's writer), known to every rank (a collective)."""
    if ctx.world == 1:
        return os.getpid()
    import torch.distributed as dist

    everyone = [None] * ctx.world
    dist.all_gather_object(everyone, (socket.gethostname(), local_rank(), os.getpid()))
    return next(pid for host, rank, pid in everyone if host == socket.gethostname() and rank == 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


class VllmEngine(WorkerProcess):
    """A running `opd.engines.vllm_worker`: `push_weights`, `generate`, `close` (also a context manager).

    `weights_dir` (default work_dir/weights) is where pushes go; with `writer=False` this engine only
    reads what another rank of its node wrote there (after the barrier of `ctx`).
    """

    name = "vLLM worker"

    def __init__(self, python: str, model_dir: Path, work_dir: Path, *, dtype: str, max_model_len: int,
                 max_logprobs: int, memory_fraction: float, device: torch.device, seed: int = 0,
                 weights_dir: Path | None = None, writer: bool = True, sleep: bool = False,
                 eager: bool | None = None, ids_only: bool = False, ctx: distributed.Context = distributed.Context()):
        self.work_dir, self.dtype = Path(work_dir), dtype
        self.weights_dir = Path(weights_dir) if weights_dir is not None else self.work_dir / "weights"
        self.rollouts_file = self.work_dir / "rollouts.safetensors"
        self.writer, self.shared, self.ctx = writer, weights_dir is not None, ctx
        self.sleep_mode, self.asleep, self.ids_only = sleep, False, ids_only
        self.work_dir.mkdir(parents=True, exist_ok=True)
        eager = enforce_eager("auto", device) if eager is None else eager
        cmd = [python, "-m", "opd.engines.vllm_worker", "--model", str(model_dir), "--dtype", dtype,
               "--max-model-len", str(max_model_len), "--max-logprobs", str(max_logprobs),
               "--memory-fraction", str(memory_fraction), "--seed", str(seed),
               *(["--enforce-eager"] if eager else []), *(["--sleep-mode"] if sleep else [])]
        super().__init__(cmd, worker_env(device))

    def _wake(self) -> None:
        if self.asleep:
            self._call(cmd="wake_up")
            self.asleep = False

    def push_weights(self, model, version: int | None = None) -> dict[str, float]:
        """The model's current weights into the live engine: {push_seconds, push_bytes, ...} of this rank.

        `version` (the step about to sample) is written into the file and checked by the worker.
        """
        self._wake()  # level-1 sleep keeps the weights in CPU RAM: they come back, then get replaced
        start, nbytes = time.perf_counter(), 0
        if self.writer:
            nbytes = write_weights(model, self.weights_dir, getattr(torch, self.dtype), version).stat().st_size
        written = time.perf_counter()
        if self.shared:
            distributed.barrier(self.ctx)  # the node's one copy is complete before any engine reads it
        reply = self._call(cmd="load_weights", path=str(self.weights_dir), version=version)
        return {"push_seconds": time.perf_counter() - start, "push_write_seconds": written - start,
                "push_load_seconds": float(reply["seconds"]), "push_bytes": float(nbytes)}

    def generate(self, prompts: list[list[int]], K: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> dict[str, Tensor]:
        """Rollouts of the engine's current weights: the tensors `opd.rollout.generate_hf` returns.

        K = 0, or any K on an engine started with `ids_only`: only the sampled tokens and their logprobs (the
        top-K comes from the trainer, `opd.engines.recompute`). With sleep mode the engine goes to sleep
        once they are back.
        """
        from safetensors.torch import load_file

        self._wake()
        self._call(cmd="generate", prompts=prompts, K=0 if self.ids_only else K, temperature=temperature, top_p=top_p,
                   max_new_tokens=max_new_tokens, seed=seed, out=str(self.rollouts_file))
        tensors = load_file(str(self.rollouts_file))
        if self.sleep_mode:  # the update that follows gets the engine's GPU memory
            self._call(cmd="sleep", level=1)
            self.asleep = True
        return tensors

    def close(self, timeout: float = 60.0) -> None:
        """Shut the worker down and delete its files (the shared weights too, by the rank that wrote them)."""
        super().close(timeout)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        if self.shared and self.writer:
            shutil.rmtree(self.weights_dir, ignore_errors=True)


@contextlib.contextmanager
def for_trainer(tr):
    """With --rollout-backend vllm: a VllmEngine started from the student, set as `tr.engine` while the
    block runs (the first step pushes the student's weights: after a resume they are a checkpoint's)."""
    args = tr.args
    if args.rollout_backend != "vllm":
        yield None
        return
    check_args(args, tr.device)
    shared = args.vllm_weight_push == "shm"
    if shared and not SHM_ROOT.is_dir():
        raise ValueError(f"--vllm-weight-push shm (train.vllm_weight_push) needs {SHM_ROOT}, which this "
                         f"machine does not have: use per_rank")
    root = args.out_dir / "rollout_weights"
    writer_pid = node_writer_pid(tr.dist) if shared else None
    if local_rank() == 0:
        remove_stale_copies()  # what a SIGKILLed job on this node left
    max_model_len = max(map(len, tr.prompt_ids)) + args.max_new_tokens
    try:
        with VllmEngine(vllm_python(args.vllm_python), args.student, root / f"rank{tr.dist.rank}", dtype=args.dtype,
                        max_model_len=max_model_len, max_logprobs=args.top_k,
                        memory_fraction=args.vllm_memory_fraction, device=tr.device, seed=args.seed,
                        weights_dir=shm_weights_dir(args.out_dir, writer_pid) if shared else None,
                        writer=not shared or local_rank() == 0, sleep=args.vllm_sleep,
                        eager=enforce_eager(args.vllm_enforce_eager, tr.device),
                        ids_only=args.recompute_rollout_logprobs, ctx=tr.dist) as eng:
            tr.engine, tr.rollout_weights_stale = eng, True
            yield eng
    finally:
        tr.engine = None
        with contextlib.suppress(OSError):
            root.rmdir()  # empty once every rank has cleaned up after itself
