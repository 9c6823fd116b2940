"""The rollouts' student quantities from the trainer's forward (`--recompute-rollout-logprobs`).

The PPO ratio's "old" log-probs, the OPD advantage and the signals read the student's per-token
log p_S(sampled token) and top-K. From an inference engine they come from its kernels, while the "new"
log-probs of the update come from the trainer's forward: the usual engine/trainer mismatch. With this
option (its flag is one of the rollout engine's, `opd.engines.vllm_engine`) the engine returns only the sampled ids (and their logprobs, kept as `engine_logprob_N` for a
diagnostic), and the trainer's own scoring forward supplies `s_logprob_N`, `s_topk_ids_NK` and
`s_topk_logprobs_NK`: `opd.engines.score.score_rollouts` run on the student (no grad, its chunked
forward), whose teacher-side outputs are then the student's. Logged per step: `rollout_logprob_mismatch`
(mean |engine − trainer| log-prob of the sampled tokens) and `rollout_logprob_mismatch_max`.
"""

from __future__ import annotations

import dataclasses

import torch

from opd.engines import accel
from opd.engines.rollout import Rollouts
from opd.engines.score import score_rollouts


def recompute(student, rollouts: Rollouts, K: int, batch_size: int, logit_chunk: int | None = None,
              max_tokens: int | None = None) -> tuple[Rollouts, dict[str, float]]:
    """(rollouts with the student's tensors from the trainer's forward, mismatch metrics)."""
    t = rollouts.tensors
    # score_rollouts gathers log p at the rollouts' s_topk ids too; one dummy id per token costs nothing.
    dummy = dataclasses.replace(rollouts, tensors={**t, "s_topk_ids_NK": torch.zeros(len(t["tokens_N"]), 1,
                                                                                     dtype=torch.int32)})
    own = score_rollouts(student, dummy, K, batch_size, logit_chunk=logit_chunk, max_tokens=max_tokens)  # log p_S
    new = {**t, "engine_logprob_N": t["s_logprob_N"], "s_logprob_N": own["t_logprob_N"].float(),
           "s_topk_ids_NK": own["t_topk_ids_NK"].to(torch.int32), "s_topk_logprobs_NK": own["t_topk_logprobs_NK"].float()}
    diff_N = (t["s_logprob_N"].float() - new["s_logprob_N"]).abs()
    metrics = {"rollout_logprob_mismatch": float(diff_N.mean()) if len(diff_N) else 0.0,
               "rollout_logprob_mismatch_max": float(diff_N.max()) if len(diff_N) else 0.0}
    return dataclasses.replace(rollouts, tensors=new), metrics


def for_step(tr, rollouts: Rollouts, student) -> Rollouts:
    """A training step's rollouts: recomputed by `student` with --recompute-rollout-logprobs (the mismatch
    figures go to `tr.engine_metrics`), else as they are."""
    args = tr.args
    if not args.recompute_rollout_logprobs:
        return rollouts
    student.eval()
    with accel.autocast(tr.device, args.dtype):  # the precision of the update's forward
        rollouts, mismatch = recompute(student, rollouts, args.top_k, args.batch_size, args.logit_chunk,
                                       args.max_tokens_per_microbatch)
    tr.engine_metrics.update(mismatch)
    return rollouts
