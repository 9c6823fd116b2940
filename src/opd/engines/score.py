"""Teacher scoring of rollouts: per response token, what the signals and the release rule need.

Per token (flat over the N response tokens, aligned with the rollouts file):
- `t_logprob_N`: log p_T of the sampled token;
- `t_on_s_logprobs_NK`: log p_T at the student's top-K ids (so compatibility C is exact);
- `t_topk_ids_NK`, `t_topk_logprobs_NK`: the teacher's own top-K;
- with `--student`: `s_on_t_logprobs_NK` (log p_S at the teacher's top-K ids, so D on S_K ∪ T_K is
  exact).
Logits are computed only at response positions, never over the prompt, and never stored per vocabulary
entry: bytes per token stay within 16·(2K + 4).
A pair across chat templates (`opd.engines.pairing`) is scored through a `TeacherView` (`score_through`):
the teacher reads its own prompt and the mapped ids; the stored ids are the student's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from opd.infra import cli, modeldirs, store
from opd.engines import accel, forward
from opd.engines.forward import (chunk_positions, load_model, logprobs_at, sampled_logprob, supervised_map,
                                 token_batches)
from opd.engines.pairing import (TeacherView, TokenizerMismatch, generation_end_ids,  # noqa: F401 (re-exported)
                                 pair_tokenizers, view_from_meta)
from opd.engines.rollout import Rollouts

KIND, VERSION = "opd-scores", 2  # 2: no full-vocabulary entropies (nothing read them)
TENSORS = ("offsets_B1", "t_logprob_N", "t_on_s_logprobs_NK", "t_topk_ids_NK", "t_topk_logprobs_NK")


def _teacher_reductions(K: int, readable_V: Tensor | None = None):
    """Per chunk: log p_T of the sampled token, at the student's top-K, and the teacher's top-K. With
    `readable_V` (a pair across templates): the top-K among the ids the student reads, and a student top-K
    id of -1 (no teacher reading) scored at the position's smallest log-prob (opd.engines.pairing)."""
    def fn(logp_CV: Tensor, tokens_C: Tensor, s_topk_ids_CK: Tensor) -> tuple[Tensor, ...]:
        if readable_V is None:
            top = logp_CV.topk(K, dim=-1)
            on_s = logprobs_at(logp_CV, s_topk_ids_CK)[0]
        else:
            top = logp_CV.masked_fill(~readable_V, float("-inf")).topk(K, dim=-1)
            ids_CK = s_topk_ids_CK.long()
            floor_C1 = logp_CV.min(-1, keepdim=True).values
            on_s = torch.where(ids_CK >= 0, logp_CV.gather(-1, ids_CK.clamp(min=0)), floor_C1)
        return (*sampled_logprob(logp_CV, tokens_C), on_s, top.indices.to(torch.int32), top.values)
    return fn


def readable_ids(t2s: Tensor, vocab: int, device) -> Tensor:
    """[vocab] bool: the teacher's ids (rows of its LM head) that the student reads."""
    out = torch.zeros(vocab, dtype=torch.bool)
    n = min(vocab, len(t2s))
    out[:n] = t2s[:n] >= 0
    return out.to(device)


@torch.no_grad()
def score_batch(teacher, prompts, responses, s_topk_ids_NK: Tensor, K: int, student=None,
                logit_chunk: int | None = None, t2s: Tensor | None = None) -> dict[str, Tensor]:
    """Per-token teacher (and optionally student) quantities for one batch of rollouts.

    The LM head, log-softmax and reductions run `logit_chunk` positions at a time on the models' device
    (`opd.engines.forward.head_map`); only the [N] and [N, K] results come back to the CPU.
    """
    tokens_N = torch.tensor([t for r in responses for t in r])
    chunk = chunk_positions(logit_chunk, teacher.lm_head.out_features)
    readable = None if t2s is None else readable_ids(t2s, teacher.lm_head.out_features, teacher.lm_head.weight.device)
    reduce = _teacher_reductions(K, readable)
    (t_lp, t_on_s, t_ids, t_lps), _ = supervised_map(teacher, prompts, responses, None, reduce,
                                                        (tokens_N, s_topk_ids_NK), chunk)
    out = {"t_logprob_N": t_lp, "t_on_s_logprobs_NK": t_on_s, "t_topk_ids_NK": t_ids, "t_topk_logprobs_NK": t_lps}
    if student is not None:
        chunk = chunk_positions(logit_chunk, student.lm_head.out_features)
        (out["s_on_t_logprobs_NK"],), _ = supervised_map(student, prompts, responses, None, logprobs_at, (t_ids,), chunk)
    return {k: v.cpu() for k, v in out.items()}


def score_rollouts(teacher, rollouts: Rollouts, K: int, batch_size: int, student=None,
                   logit_chunk: int | None = None, max_tokens: int | None = None,
                   t2s: Tensor | None = None) -> dict[str, Tensor]:
    """Score every rollout, at most `batch_size` sequences and `max_tokens` padded tokens per forward pass.

    Flat tensors aligned with the rollouts. `t2s`: rollouts already in a cross-template teacher's ids
    (`TeacherView.rollouts`), whose top-K is then kept to ids the student reads (in teacher ids).
    """
    seqs = rollouts.sequences()
    offsets = rollouts.tensors["offsets_B1"]
    parts: list[dict[str, Tensor]] = []
    for rows in token_batches([len(p) + len(r) for p, r in seqs], max_tokens, batch_size, forward.BUDGET_FLAG):
        lo, hi = int(offsets[rows[0]]), int(offsets[rows[-1] + 1])
        s_topk = rollouts.tensors["s_topk_ids_NK"][lo:hi]
        chunk = [seqs[i] for i in rows]
        parts.append(score_batch(teacher, [p for p, _ in chunk], [r for _, r in chunk], s_topk, K, student,
                                 logit_chunk, t2s))
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out["offsets_B1"] = offsets.clone()
    return out


def student_on_teacher_topk(student, rollouts: Rollouts, t_topk_ids_NK: Tensor, K: int,
                            batch_size: int) -> Tensor:
    """log p_S at the teacher's top-K ids: the scoring code run on the student with those ids."""
    swapped = dataclasses.replace(rollouts, tensors={**rollouts.tensors, "s_topk_ids_NK": t_topk_ids_NK})
    return score_rollouts(student, swapped, K, batch_size)["t_on_s_logprobs_NK"]


def score_through(view: TeacherView, rollouts: Rollouts, score, K: int, batch_size: int,
                  student=None) -> dict[str, Tensor]:
    """A cross-template pair's scores: `score(teacher rollouts, t2s)` (in process or a worker) on the teacher's
    view, its top-K mapped back to student ids; with `student`, log p_S at those ids (exact signals)."""
    out = score(view.rollouts(rollouts), view.pair.t2s)
    out["t_topk_ids_NK"] = view.pair.to_student(out["t_topk_ids_NK"])
    out["offsets_B1"] = rollouts.tensors["offsets_B1"].clone()
    if student is not None:
        out["s_on_t_logprobs_NK"] = student_on_teacher_topk(student, rollouts, out["t_topk_ids_NK"], K, batch_size)
    return out


def save_scores(path: Path, rollouts: Rollouts, tensors: dict[str, Tensor], meta: dict) -> None:
    store.save(path, KIND, VERSION, tensors, rollouts.ids, {**meta, "rollouts_fingerprint": rollouts.fingerprint()})


def load_scores(path: Path | str, rollouts: Rollouts, rollouts_path: Path | str = "rollouts") -> dict[str, Tensor]:
    """Scores of exactly these rollouts, or a StoreError naming both files and the mismatch."""
    tensors, ids, meta = store.load(path, KIND, VERSION, TENSORS)
    if ids != rollouts.ids:
        diff = next((i for i, (a, b) in enumerate(zip(ids, rollouts.ids)) if a != b), min(len(ids), len(rollouts.ids)))
        raise store.StoreError(f"{path} does not score {rollouts_path}: rollout ids differ ({len(ids)} vs "
                               f"{len(rollouts.ids)} rollouts, first difference at index {diff})")
    if not torch.equal(tensors["offsets_B1"], rollouts.tensors["offsets_B1"]):
        b = int((tensors["offsets_B1"] != rollouts.tensors["offsets_B1"]).nonzero()[0, 0]) - 1
        raise store.StoreError(f"{path} does not score {rollouts_path}: response lengths differ "
                               f"(first at rollout {rollouts.ids[max(b, 0)]!r})")
    if meta.get("rollouts_fingerprint") != rollouts.fingerprint():
        raise store.StoreError(f"{path} does not score {rollouts_path}: same ids and lengths but other tokens")
    store.check_finite(path, tensors, ids, tuple(k for k in tensors if k.startswith(("t_", "s_")) and "ids" not in k))
    return tensors


# The flags of add_job_args (the diagnostic jobs' device, precision and memory bounds) -> their config keys.
JOB_FLAGS = {
    "device": "diagnose.device",
    "dtype": "diagnose.dtype",
    "logit_chunk": "diagnose.logit_chunk",
    "max_tokens_per_microbatch": "diagnose.max_tokens_per_microbatch",
}
FLAGS = {"top_k": "diagnose.top_k", "batch_size": cli.POSITIVE, **JOB_FLAGS}  # flag -> config key (opd.infra.cli)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description="Score rollouts with the teacher (per-token top-K data).")
    p.add_argument("--rollouts", type=Path, required=True, help="rollouts file from opd.engines.rollout")
    p.add_argument("--teacher", type=Path, required=True, help="teacher model directory")
    p.add_argument("--student", type=Path, default=None,
                   help="student model directory: also store log p_S on the teacher's top-K (exact D)")
    p.add_argument("--out", type=Path, required=True, help="scores file to write (.safetensors)")
    p.add_argument("--top-k", type=int, default=16, help="K of the teacher's own top-K")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--name", default="student", help="name of the scored student, for tracking")
    p.add_argument("--study", default="miniature", help="MLflow experiment name")
    add_job_args(p)
    return cli.parse(p, argv, FLAGS)


def add_job_args(p: argparse.ArgumentParser) -> None:
    """Flags of every scoring-like job (this one, the fixed-context bank): threads, memory bounds, device, dtype."""
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    forward.add_memory_args(p)
    accel.add_args(p)


def start_job(args: argparse.Namespace) -> torch.device:
    """Check the memory flags, set the threads; the device the job's models go to."""
    forward.check_memory_args(args)
    torch.set_num_threads(args.threads)
    return accel.resolve_device(args.device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from opd.infra import tracking

    device = start_job(args)
    rollouts = Rollouts.load(args.rollouts)
    student_dir = modeldirs.check_dir(args.student or rollouts.meta["model_dir"], "--student")
    modeldirs.check_dir(args.teacher, "--teacher")
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    t_tokenizer = AutoTokenizer.from_pretrained(str(args.teacher))
    pair = pair_tokenizers(tokenizer, t_tokenizer, str(student_dir), str(args.teacher), generation_end_ids(student_dir))
    view = view_from_meta(pair, t_tokenizer, rollouts, args.rollouts)  # None: one tokenizer and template
    modeldirs.check_top_k(args.top_k, len(tokenizer), "--top-k", args.teacher)
    dtype = accel.teacher_dtype(args.dtype)  # no updates: bf16 weights with --dtype bfloat16
    teacher = load_model(args.teacher, device, dtype)
    student = load_model(args.student, device, dtype) if args.student else None
    with tracking.run(args.study, f"score[{args.name}]", params=vars(args), tags={"model": args.name}) as run:
        start = time.time()
        with accel.autocast(device, args.dtype):
            score = lambda r, t2s=None, s=student: score_rollouts(  # noqa: E731
                teacher, r, args.top_k, args.batch_size, s, args.logit_chunk, args.max_tokens_per_microbatch, t2s)
            tensors = score(rollouts) if view is None else score_through(
                view, rollouts, lambda r, t2s: score(r, t2s, None), args.top_k, args.batch_size, student)
        seconds = time.time() - start
        save_scores(args.out, rollouts, tensors, {"teacher": str(args.teacher), "K": args.top_k})
        n = int(tensors["offsets_B1"][-1])
        run.log_metrics({"tokens_per_second": n / seconds, "bytes_per_token": args.out.stat().st_size / n,
                         "mean_teacher_logprob": float(tensors["t_logprob_N"].mean())})
    print(json.dumps({"tokens": n, "tokens_per_second": n / seconds}))


if __name__ == "__main__":
    cli.run(main)
