"""The JSON-lines protocol of our engine workers (the vLLM rollout worker, the teacher worker), both sides.

A worker is a persistent process that reads one JSON command per line on stdin and answers one JSON line
per command on its original stdout: {"ok": true, ...} or {"ok": false, "error": traceback}; its first line,
once it is up, is {"ok": true, "ready": true, ...}. Everything else it prints (library logs, child
processes) goes to stderr, which the trainer passes through to its own log. Tensors travel as
safetensors files whose paths the commands name (written atomically, never read half-written).

`WorkerProcess` is the trainer's side: it starts the worker in its own process group, so `close()` (on
exit, on an exception) can end it and every process it started; if the trainer is killed outright, the
worker sees the end of its stdin and shuts itself down. A worker that dies mid-run gives one Fault (a
RuntimeError) naming its exit code and signal at the next answer, never a hang.

Only the standard library (and opd.infra.io, which imports nothing else) is imported here: the vLLM worker
runs under another environment's python. A worker that is gone is a `Fault`: `opd.infra.cli.run` prints it
in one line (the worker's own log is above it on stderr); the last complete checkpoint stays on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import traceback
from typing import Callable

from opd.infra.io import Fault


def _signal(code: int) -> str:
    """A negative exit code is the signal that ended the worker (SIGKILL is also what the kernel's OOM killer sends)."""
    if code >= 0:
        return ""
    with contextlib.suppress(ValueError):
        return f": killed by {signal.Signals(-code).name}"
    return ""


class WorkerProcess:
    """A running worker: `call(cmd=..., ...)` -> its answer dict; `close()` (also a context manager)."""

    name = "worker"

    def __init__(self, cmd: list[str], env: dict[str, str]):
        # Own process group: close() can end the worker and its children (vLLM's engine core) together.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        try:
            self.info = self._answer()
        except BaseException:
            self.close()
            raise

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise Fault(f"the {self.name} exited (code {code}{_signal(code)}) without answering; its log is "
                        f"above on stderr")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"the {self.name} failed:\n{reply.get('error')}")
        return reply

    def _call(self, **cmd) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as e:  # it died since its last answer
            code = self.proc.wait()
            raise Fault(f"the {self.name} is gone (code {code}{_signal(code)}); its log is above on stderr") from e
        return self._answer()

    def close(self, timeout: float = 60.0) -> None:
        """Shut the worker down (politely, then by signal to its whole group)."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write(json.dumps({"cmd": "shutdown"}) + "\n")
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group: the worker's own children too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(handlers: dict[str, Callable[[dict], dict]], lines, reply) -> None:
    """Answer commands with `handlers[cmd["cmd"]](cmd)` until `shutdown` or the end of input."""
    for line in lines:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            if cmd["cmd"] == "shutdown":
                reply({"ok": True})
                return
            if cmd["cmd"] not in handlers:
                raise ValueError(f"unknown command {cmd['cmd']!r}")
            reply({"ok": True, **handlers[cmd["cmd"]](cmd)})
        except Exception:  # the trainer decides what to do: it raises with this traceback
            reply({"ok": False, "error": traceback.format_exc()})


def run(start: Callable[[], tuple[dict[str, Callable[[dict], dict]], dict, Callable[[], None]]]) -> None:
    """A worker's main: `start()` -> (handlers, ready info, cleanup); serve stdin until shutdown.

    The protocol owns the original stdout; fd 1 (and every child's stdout) goes to stderr.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    # SIGTERM from the trainer: leave through `finally`, so the cleanup runs (vLLM's engine-core process).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    cleanup = None
    try:
        handlers, info, cleanup = start()
        reply({"ok": True, "ready": True, **info})
        serve(handlers, sys.stdin, reply)
    except Exception:
        reply({"ok": False, "error": traceback.format_exc()})
        raise
    finally:
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
