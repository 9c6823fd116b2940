"""A teacher that lives in its own process (`--teacher-placement worker`, config `train.teacher_placement`).

A forward-only worker holding the teacher (Hugging Face, on its own device or the CPU) and speaking the
JSON-lines protocol of `opd.engines.worker_proc`, like the vLLM rollout worker:

    python -m opd.engines.teacher_worker --teacher DIR --device cpu --dtype float32 --threads 1

    {"cmd": "score", "rollouts": PATH, "K", "batch_size", "out": PATH}
        the rollouts' tensors (a safetensors file) scored by `opd.engines.score.score_rollouts`
        -> `out`: the [N] and [N, K] tensors of scoring (t_logprob_N, t_on_s_logprobs_NK, t_topk_*)
    {"cmd": "shutdown"}

The trainer then needs nothing of the teacher's but those tensors, so the teacher need not fit beside the
student. Exact signals: the student's log p at the teacher's top-K ids (`s_on_t_logprobs_NK`) is computed
in the trainer, by the same scoring code run on the student with those ids (`score_rollouts` on the
student: its `t_on_s_logprobs_NK` is then log p_S at the given ids), so worker scores equal in-process
scores exactly when both run the same model at the same precision and threads (tests/test_teacher_worker.py).
A worker that dies mid-run gives one RuntimeError at the step that needed it (never a hang).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from opd.engines import accel, teacher_server, worker_proc
from opd.engines.rollout import Rollouts
from opd.engines.pairing import PromptBook
from opd.engines.score import score_rollouts, score_through, student_on_teacher_topk
from opd.engines.vllm_engine import SHM_ROOT, owner_tag, remove_stale_copies, worker_env

PLACEMENTS = ("in_process", "worker", "server")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher-placement", choices=PLACEMENTS, default="in_process",
                        help="in_process: the teacher beside the student; worker: a forward-only teacher "
                             "process (opd.engines.teacher_worker) that returns the scoring tensors; server: a "
                             "vLLM server at --teacher-url (opd.engines.teacher_server; top-K signals only)")
    parser.add_argument("--teacher-device", default=None,
                        help="device of the teacher worker (cpu, cuda, cuda:1; default: --device)")
    teacher_server.add_args(parser)


def in_process_teacher(args: argparse.Namespace, device: torch.device):
    """The teacher as the trainer (and the worker) loads it: on `device`, frozen, bf16 with --dtype bfloat16;
    None with --teacher-placement worker or server (the worker or the server holds it)."""
    from transformers import AutoModelForCausalLM

    if getattr(args, "teacher_placement", "in_process") != "in_process":
        return None
    teacher = AutoModelForCausalLM.from_pretrained(str(args.teacher), dtype=accel.teacher_dtype(args.dtype))
    return teacher.to(device).eval().requires_grad_(False)


class TeacherWorker(worker_proc.WorkerProcess):
    """The trainer's handle on a running teacher worker: `score(rollouts, K, batch_size)`."""

    name = "teacher worker"

    def __init__(self, teacher: Path, *, device: str, dtype: str, threads: int, python: str = sys.executable):
        # Tensors travel through files: in RAM (/dev/shm) where the machine has it, named by their owner
        # (this process), so that a SIGKILLed run's files are removed by the next start on the node.
        remove_stale_copies()
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"opd-teacher{owner_tag()}-",
                                              dir=SHM_ROOT if SHM_ROOT.is_dir() else None))
        cmd = [python, "-m", "opd.engines.teacher_worker", "--teacher", str(teacher), "--device", device,
               "--dtype", dtype, "--threads", str(threads)]
        super().__init__(cmd, worker_env(torch.device("cpu")))  # its own CUDA_VISIBLE_DEVICES, untouched

    def score(self, rollouts: Rollouts, K: int, batch_size: int, t2s: Tensor | None = None) -> dict[str, Tensor]:
        """Scores of `rollouts`; with `t2s`, rollouts in a cross-template teacher's ids (score_rollouts' t2s)."""
        from safetensors.torch import load_file, save_file

        from opd.infra.io import atomic_path

        src, out = self.work_dir / "rollouts.safetensors", self.work_dir / "scores.safetensors"
        extra = {} if t2s is None else {"t2s_V": t2s}
        with atomic_path(src) as tmp:
            save_file({k: v.contiguous() for k, v in {**rollouts.tensors, **extra}.items()}, str(tmp))
        out.unlink(missing_ok=True)  # never read the previous step's answer
        self._call(cmd="score", rollouts=str(src), K=K, batch_size=batch_size, out=str(out))
        return load_file(str(out))

    def close(self, timeout: float = 60.0) -> None:
        super().close(timeout)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def teacher_scores(tr, rollouts: Rollouts, student) -> dict[str, Tensor]:
    """The step's scores, from the teacher in this process, the teacher worker or the teacher server
    (`tr.teacher`); `student` (the model rollouts come from) supplies the exact signals' log p_S."""
    args = tr.args
    student = student if args.signal_disagreement == "exact" else None  # exact D needs log p_S at T_K
    book: PromptBook | None = tr.prompt_book
    if book is not None:  # a pair across chat templates: the teacher reads its own prompts (opd.engines.pairing)
        score = (lambda r, t2s: tr.teacher.score(r, args.top_k, args.batch_size, t2s)) if isinstance(
            tr.teacher, TeacherWorker) else (lambda r, t2s: score_rollouts(
                tr.teacher, r, args.top_k, args.batch_size, logit_chunk=args.logit_chunk,
                max_tokens=args.max_tokens_per_microbatch, t2s=t2s))
        return score_through(book.view(rollouts.ids), rollouts, score, args.top_k, args.batch_size, student)
    if not isinstance(tr.teacher, (TeacherWorker, teacher_server.ServedTeacher)):
        return score_rollouts(tr.teacher, rollouts, args.top_k, args.batch_size, student=student,
                              logit_chunk=args.logit_chunk, max_tokens=args.max_tokens_per_microbatch)
    scores = tr.teacher.score(rollouts, args.top_k, args.batch_size)
    if student is not None:
        scores["s_on_t_logprobs_NK"] = student_on_teacher_topk(student, rollouts, scores["t_topk_ids_NK"],
                                                               args.top_k, args.batch_size)
    return scores


@contextlib.contextmanager
def for_trainer(tr):
    """With --teacher-placement worker: a TeacherWorker as `tr.teacher` while the block runs; with server: a
    ServedTeacher, checked against the server (URL, model, K) before the first step."""
    args = tr.args
    if args.teacher_placement == "server":
        if tr.prompt_book is not None:  # the server would read the student's prompt, not its own template's
            raise teacher_server.ServerError(
                f"train.teacher_placement: server does not serve a pair across chat templates yet ({args.teacher} "
                f"-> {args.student}); use in_process or worker (docs/training.md)")
        tr.teacher = teacher_server.ServedTeacher(args.teacher_url, args.teacher, timeout=args.teacher_timeout,
                                                  concurrency=args.teacher_concurrency)
        tr.teacher.check(tr.tokenizer, args.top_k)
        try:
            yield tr.teacher
        finally:
            tr.teacher = None
        return
    if args.teacher_placement != "worker":
        yield None
        return
    with TeacherWorker(args.teacher, device=args.teacher_device or args.device, dtype=args.dtype,
                       threads=args.threads) as worker:
        tr.teacher = worker
        try:
            yield worker
        finally:
            tr.teacher = None


def start(args: argparse.Namespace):
    """(handlers, ready info, cleanup) of the worker: the teacher loaded as the trainer would load it."""
    torch.set_num_threads(args.threads)
    # An explicit cuda:N is the worker's own GPU; auto/cpu/cuda resolve as the trainer's --device does.
    device = torch.device(args.device) if ":" in args.device else accel.resolve_device(args.device)
    teacher = in_process_teacher(args, device)

    def score(cmd: dict) -> dict:
        from safetensors.torch import load_file, save_file

        from opd.infra.io import atomic_path

        start_s = time.perf_counter()
        tensors = load_file(cmd["rollouts"])
        t2s = tensors.pop("t2s_V", None)  # a cross-template pair: rollouts already in the teacher's ids
        rollouts = Rollouts([str(b) for b in range(len(tensors["offsets_B1"]) - 1)], tensors)
        with accel.autocast(device, args.dtype):  # the trainer's own scoring precision
            out = score_rollouts(teacher, rollouts, cmd["K"], cmd["batch_size"], t2s=t2s)
        with atomic_path(cmd["out"]) as tmp:
            save_file({k: v.contiguous() for k, v in out.items()}, str(tmp))
        return {"tokens": int(tensors["offsets_B1"][-1]), "seconds": time.perf_counter() - start_s}

    return {"score": score}, {"device": str(device)}, lambda: None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Forward-only teacher worker driven by JSON lines on stdin.")
    p.add_argument("--teacher", type=Path, required=True, help="teacher: Hugging Face model directory")
    p.add_argument("--device", default="cpu", help="device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute precision, as the trainer's --dtype (bf16 weights with bfloat16)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    worker_proc.run(lambda: start(args))


if __name__ == "__main__":
    main()
