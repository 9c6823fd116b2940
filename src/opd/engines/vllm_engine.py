"""The trainer's side of the persistent vLLM rollout engine (`--rollout-backend vllm`).

vLLM cannot be imported next to the trainer's CPU torch stack, so the engine lives in a worker process
(`python -m opd.engines.vllm_worker`, started with `--vllm-python`) that stays up for the whole run and speaks
JSON lines over its stdin/stdout. Each step's rollouts come from the current student: after an optimizer
step the trainer writes the weights atomically to OUT/rollout_weights/rank{r}/model.safetensors and the
worker reloads them in place (vLLM's `reload_weights` through `collective_rpc`; no engine restart).
Rollouts come back as a safetensors file with the tensors of `opd.rollout.generate_hf`.

The worker runs in its own process group: `close()` (on exit, on an exception) asks it to shut down and
then kills the group, so no engine process outlives the trainer; if the trainer is killed outright, the
worker sees the end of its stdin and shuts itself down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import Tensor

import opd
from opd.infra.io import atomic_path

VLLM_PYTHON_ENV = "OPD_VLLM_PYTHON"
BACKENDS = ("hf", "vllm")


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


def write_weights(model, directory: Path, dtype: torch.dtype) -> Path:
    """The model's weights as directory/model.safetensors, renamed into place (never seen half-written).

    A tied LM head shares its tensor with the embedding and is written once, as in the model's own
    checkpoint; vLLM ties it again. The temporary name does not end in .safetensors, so a reload never
    picks it up.
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
    with atomic_path(final) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return final


class VllmEngine:
    """A running `opd.engines.vllm_worker`: `push_weights`, `generate`, `close` (also a context manager)."""

    def __init__(self, python: str, model_dir: Path, work_dir: Path, *, dtype: str, max_model_len: int,
                 max_logprobs: int, memory_fraction: float, device: torch.device, seed: int = 0):
        self.work_dir, self.dtype = Path(work_dir), dtype
        self.weights_dir, self.rollouts_file = self.work_dir / "weights", self.work_dir / "rollouts.safetensors"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cmd = [python, "-m", "opd.engines.vllm_worker", "--model", str(model_dir), "--dtype", dtype,
               "--max-model-len", str(max_model_len), "--max-logprobs", str(max_logprobs),
               "--memory-fraction", str(memory_fraction), "--seed", str(seed)]
        # Own process group: close() can end the worker and vLLM's engine-core process together.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=worker_env(device), start_new_session=True)
        try:
            self.info = self._answer()
        except BaseException:
            self.close()
            raise

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the vLLM worker exited (code {code}) without answering; its log is on stderr")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"the vLLM worker failed:\n{reply.get('error')}")
        return reply

    def _call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def push_weights(self, model) -> dict:
        """Write the model's current weights and reload them into the live engine."""
        write_weights(model, self.weights_dir, getattr(torch, self.dtype))
        return self._call(cmd="load_weights", path=str(self.weights_dir))

    def generate(self, prompts: list[list[int]], K: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> dict[str, Tensor]:
        """Rollouts of the engine's current weights: the tensors `opd.rollout.generate_hf` returns."""
        from safetensors.torch import load_file

        self._call(cmd="generate", prompts=prompts, K=K, temperature=temperature, top_p=top_p,
                   max_new_tokens=max_new_tokens, seed=seed, out=str(self.rollouts_file))
        return load_file(str(self.rollouts_file))

    def close(self, timeout: float = 60.0) -> None:
        """Shut the worker down (politely, then by signal to its whole group) and delete its files."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write(json.dumps({"cmd": "shutdown"}) + "\n")
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group: vLLM's engine-core process too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def for_trainer(tr):
    """With --rollout-backend vllm: a VllmEngine started from the student, set as `tr.engine` while the
    block runs (the first step pushes the student's weights: after a resume they are a checkpoint's)."""
    args = tr.args
    if args.rollout_backend != "vllm":
        yield None
        return
    root = args.out_dir / "rollout_weights"
    max_model_len = max(map(len, tr.prompt_ids)) + args.max_new_tokens
    try:
        with VllmEngine(vllm_python(args.vllm_python), args.student, root / f"rank{tr.dist.rank}", dtype=args.dtype,
                        max_model_len=max_model_len, max_logprobs=args.top_k,
                        memory_fraction=args.vllm_memory_fraction, device=tr.device, seed=args.seed) as eng:
            tr.engine, tr.rollout_weights_stale = eng, True
            yield eng
    finally:
        tr.engine = None
        with contextlib.suppress(OSError):
            root.rmdir()  # empty once every rank has cleaned up after itself
