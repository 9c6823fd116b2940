"""Teacher scoring of rollouts: per response token, what the signals and the release rule need.

Per token (flat over the N response tokens, aligned with the rollouts file):
- `t_logprob_N`: log p_T of the sampled token;
- `t_on_s_logprobs_NK`: log p_T at the student's top-K ids (so compatibility C is exact);
- `t_topk_ids_NK`, `t_topk_logprobs_NK`: the teacher's own top-K;
- with `--student`: `s_on_t_logprobs_NK` (log p_S at the teacher's top-K ids, so D on S_K ∪ T_K is
  exact).
Logits are computed only at response positions, never over the prompt, and never stored per vocabulary
entry: bytes per token stay within 16·(2K + 4).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from opd.infra import cli, modeldirs, store
from opd.infra.io import InputError
from opd.engines.forward import response_logits
from opd.engines.rollout import Rollouts

KIND, VERSION = "opd-scores", 2  # 2: no full-vocabulary entropies (nothing read them)
TENSORS = ("offsets_B1", "t_logprob_N", "t_on_s_logprobs_NK", "t_topk_ids_NK", "t_topk_logprobs_NK")


class TokenizerMismatch(InputError):
    """Teacher and student tokenizers map text to ids differently: OPD would compare unrelated tokens."""


def check_tokenizers(student, teacher, student_name: str = "student", teacher_name: str = "teacher") -> None:
    """Same vocabulary mapping and the same special tokens, or a TokenizerMismatch saying what differs."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(sv))[:5]
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])[:5]
        raise TokenizerMismatch(
            f"tokenizers of {student_name} and {teacher_name} differ: vocab sizes {len(sv)} vs {len(tv)}; "
            f"only in {student_name}: {only_s}; only in {teacher_name}: {only_t}; different ids: {moved}")
    for attr in ("eos_token", "pad_token", "bos_token", "unk_token"):
        if getattr(student, attr) != getattr(teacher, attr):
            raise TokenizerMismatch(f"{attr} differs: {student_name} has {getattr(student, attr)!r}, "
                                    f"{teacher_name} has {getattr(teacher, attr)!r}")


@torch.no_grad()
def score_batch(teacher, prompts, responses, s_topk_ids_NK: Tensor, K: int, student=None) -> dict[str, Tensor]:
    """Per-token teacher (and optionally student) quantities for one batch of rollouts.

    The [N, V] log-softmax and its reductions run on the models' device; only the [N] and [N, K]
    results come back to the CPU (a GPU would otherwise ship N·V floats per batch).
    """
    logp_NV = torch.log_softmax(response_logits(teacher, prompts, responses).float(), dim=-1)
    dev = logp_NV.device
    tokens_N = torch.tensor([t for r in responses for t in r], device=dev)
    top = logp_NV.topk(K, dim=-1)
    out = {
        "t_logprob_N": logp_NV.gather(-1, tokens_N[:, None])[:, 0],
        "t_on_s_logprobs_NK": logp_NV.gather(-1, s_topk_ids_NK.long().to(dev)),
        "t_topk_ids_NK": top.indices.to(torch.int32),
        "t_topk_logprobs_NK": top.values,
    }
    if student is not None:
        s_logp_NV = torch.log_softmax(response_logits(student, prompts, responses).float(), dim=-1)
        out["s_on_t_logprobs_NK"] = s_logp_NV.gather(-1, top.indices.to(s_logp_NV.device))
    return {k: v.cpu() for k, v in out.items()}


def score_rollouts(teacher, rollouts: Rollouts, K: int, batch_size: int, student=None) -> dict[str, Tensor]:
    """Score every rollout, `batch_size` sequences at a time; flat tensors aligned with the rollouts."""
    seqs = rollouts.sequences()
    offsets = rollouts.tensors["offsets_B1"]
    parts: list[dict[str, Tensor]] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        lo, hi = int(offsets[start]), int(offsets[min(start + batch_size, len(seqs))])
        s_topk = rollouts.tensors["s_topk_ids_NK"][lo:hi]
        parts.append(score_batch(teacher, [p for p, _ in chunk], [r for _, r in chunk], s_topk, K, student))
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out["offsets_B1"] = offsets.clone()
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


FLAGS = {  # flag -> the config key it stands for (opd.infra.cli); one line per flag
    "top_k": "diagnose.top_k",
    "batch_size": cli.POSITIVE,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description="Score rollouts with the teacher (per-token top-K data).")
    p.add_argument("--rollouts", type=Path, required=True, help="rollouts file from opd.engines.rollout")
    p.add_argument("--teacher", type=Path, required=True, help="teacher model directory")
    p.add_argument("--student", type=Path, default=None,
                   help="student model directory: also store log p_S on the teacher's top-K (exact D)")
    p.add_argument("--out", type=Path, required=True, help="scores file to write (.safetensors)")
    p.add_argument("--top-k", type=int, default=16, help="K of the teacher's own top-K")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--name", default="student", help="name of the scored student, for tracking")
    p.add_argument("--study", default="miniature", help="MLflow experiment name")
    return cli.validate(p.parse_args(argv), FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.infra import tracking

    torch.set_num_threads(args.threads)
    rollouts = Rollouts.load(args.rollouts)
    student_dir = modeldirs.check_dir(args.student or rollouts.meta["model_dir"], "--student")
    modeldirs.check_dir(args.teacher, "--teacher")
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    check_tokenizers(tokenizer, AutoTokenizer.from_pretrained(str(args.teacher)), str(student_dir), str(args.teacher))
    modeldirs.check_top_k(args.top_k, len(tokenizer), "--top-k", args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(str(args.teacher)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(args.student)).eval() if args.student else None
    with tracking.run(args.study, f"score[{args.name}]", params=vars(args), tags={"model": args.name}) as run:
        start = time.time()
        tensors = score_rollouts(teacher, rollouts, args.top_k, args.batch_size, student)
        seconds = time.time() - start
        save_scores(args.out, rollouts, tensors, {"teacher": str(args.teacher), "K": args.top_k})
        n = int(tensors["offsets_B1"][-1])
        run.log_metrics({"tokens_per_second": n / seconds, "bytes_per_token": args.out.stat().st_size / n,
                         "mean_teacher_logprob": float(tensors["t_logprob_N"].mean())})
    print(json.dumps({"tokens": n, "tokens_per_second": n / seconds}))


if __name__ == "__main__":
    cli.run(main)
