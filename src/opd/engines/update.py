"""The training update: one optimizer step on the OPD loss of the masked positions, in micro-batches.

Memory at any response length (docs/training.md, "Memory"):
- each sequence is cut after its last supervised token (a released suffix costs no forward pass, and a
  sequence with nothing supervised none at all); the cut sequences are packed into micro-batches of at
  most `--max-tokens-per-microbatch` padded tokens, with gradient accumulation;
- the LM head runs `--logit-chunk` positions at a time, each chunk checkpointed (`opd.engines.forward`);
- `--gradient-checkpointing` recomputes the trunk's layers in backward instead of keeping their activations.

Exactness: micro-batch i's loss is weighted by units_i / units, the share of the rank's loss units
(supervised tokens for token_mean, supervised sequences for sequence_mean) it holds, so the summed
gradient is the whole batch's for every loss and aggregation (sequences are never split across
micro-batches). Under DDP only the last micro-batch's backward all-reduces (`no_sync` before), and
`distributed.loss_scale` on top makes the average over ranks the global batch's gradient. Under FSDP every
forward and backward all-gathers each layer, so the ranks must run as many micro-batches: a rank with
fewer runs idle ones (one supervised token, weight 0: its gradient adds exact zeros) up to the most. When the
whole batch fits one micro-batch (the miniature study), it is one forward and one backward in rollout
order, as before: the same numbers bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor

from opd.engines import accel, distributed, forward
from opd.math.loss import TOPK_LOSSES, aggregate, opd_loss


@dataclasses.dataclass
class MicroBatch:
    """Supervised sequences cut after their last supervised token, and where their kept tokens sit."""
    prompts: list[list[int]]
    responses: list[list[int]]
    keep_N: Tensor  # over the cut responses' tokens (flat): which get a loss
    pos_M: Tensor  # flat rollout positions (into the N response tokens) of the kept tokens, in order
    seq_M: Tensor  # the micro-batch's sequence (0, 1, ...) of each kept token
    idle: bool = False  # only there to match another rank's collectives: no loss units, weight 0

    def units(self, aggregation: str) -> int:
        if self.idle:
            return 0
        return len(self.pos_M) if aggregation == "token_mean" else len(self.prompts)

    def idle_copy(self) -> "MicroBatch":
        """Its first sequence cut after its first supervised token (every sequence here has one), idle."""
        first = int(self.keep_N.nonzero()[0, 0])
        keep_N = torch.zeros(first + 1, dtype=torch.bool)
        keep_N[-1] = True
        return MicroBatch([self.prompts[0]], [self.responses[0][:first + 1]], keep_N, self.pos_M[:1], self.seq_M[:1],
                          idle=True)


def micro_batches(seqs: list[tuple[list[int], list[int]]], mask_BT: Tensor, max_tokens: int) -> list[MicroBatch]:
    """The supervised sequences in micro-batches of at most `max_tokens` padded tokens.

    In rollout order when they all fit in one; otherwise longest first (similar lengths share a
    micro-batch, so padding stays small). A sequence that alone exceeds the budget is an error naming it.
    """
    cut = []  # (rollout index, cut length, supervised positions within the response)
    start = 0
    for b, (prompt, response) in enumerate(seqs):
        hits_T = mask_BT[b, : len(response)].nonzero()[:, 0]
        if len(hits_T):
            cut.append((b, int(hits_T[-1]) + 1, hits_T + start))
        start += len(response)
    lengths = [len(seqs[b][0]) + n for b, n, _ in cut]
    if cut and max(lengths) * len(cut) > max_tokens:
        order = sorted(range(len(cut)), key=lambda i: -lengths[i])
        groups = [[order[j] for j in g] for g in forward.token_batches([lengths[i] for i in order], max_tokens,
                                                                       flag=forward.BUDGET_FLAG)]
    else:
        groups = [list(range(len(cut)))] if cut else []
    out = []
    for g in groups:
        items = [cut[i] for i in g]
        out.append(MicroBatch(
            prompts=[seqs[b][0] for b, _, _ in items], responses=[seqs[b][1][:n] for b, n, _ in items],
            keep_N=torch.cat([mask_BT[b, :n] for b, n, _ in items]), pos_M=torch.cat([pos for _, _, pos in items]),
            seq_M=torch.cat([torch.full((len(pos),), j, dtype=torch.long) for j, (_, _, pos) in enumerate(items)])))
    return out


def match_ranks(tr, mbs: list[MicroBatch]) -> list[MicroBatch]:
    """Under FSDP, idle micro-batches up to the largest count over the ranks (module docstring); else `mbs`."""
    if tr.dist.world == 1 or not hasattr(tr.ddp, "set_requires_gradient_sync"):
        return mbs
    most = distributed.max_over_ranks(tr.dist, len(mbs))
    return mbs + [mbs[-1].idle_copy() for _ in range(most - len(mbs))]


def _distribution_reduction(kind: str):
    """Per-token loss of a distribution-matching option on one chunk (opd.math.loss), from the chunk's log p_S."""
    loss_fn = TOPK_LOSSES[kind]
    return lambda logp_CV, ids_CK, t_lps_CK: (loss_fn(logp_CV, ids_CK, t_lps_CK),)


def _distribution_inputs(kind: str, rollout_t: dict[str, Tensor], score_t: dict[str, Tensor],
                         pos_M: Tensor) -> tuple[Tensor, Tensor]:
    """(ids, teacher logprobs) per kept position: the student's top-K for reverse KL, the teacher's otherwise."""
    if kind == "topk_reverse_kl":
        return rollout_t["s_topk_ids_NK"][pos_M], score_t["t_on_s_logprobs_NK"][pos_M]
    return score_t["t_topk_ids_NK"][pos_M], score_t["t_topk_logprobs_NK"][pos_M]


def micro_loss(tr, mb: MicroBatch, rollout_t: dict[str, Tensor], score_t: dict[str, Tensor],
               chunk: int) -> tuple[Tensor, Tensor]:
    """(the micro-batch's aggregated OPD loss, all-logits-finite flag), with the graph for backward."""
    args = tr.args
    if args.loss == "pg":
        fn, per_pos = forward.sampled_logprob, (rollout_t["tokens_N"][mb.pos_M],)
    else:
        fn, per_pos = _distribution_reduction(args.loss), _distribution_inputs(args.loss, rollout_t, score_t, mb.pos_M)
    with accel.autocast(tr.device, args.dtype):  # the forward only: backward follows autocast's dtypes
        if tr.ddp is None:
            (out_M,), finite = forward.supervised_map(tr.student, mb.prompts, mb.responses, mb.keep_N, fn, per_pos,
                                                      chunk)
        else:  # through DDP's forward: backward then averages the gradients over ranks
            (out_M,), finite = tr.ddp(mb.prompts, mb.responses, mb.keep_N, fn, per_pos, chunk)
    dev, all_M = out_M.device, torch.ones_like(mb.pos_M, dtype=torch.bool).to(out_M.device)
    if args.loss == "pg":
        old_M, t_M = (x[mb.pos_M].to(dev) for x in (rollout_t["s_logprob_N"], score_t["t_logprob_N"]))
        return opd_loss(out_M, old_M, t_M, all_M, args.clip_eps, args.aggregation, mb.seq_M.to(dev),
                        clip_eps_high=args.clip_eps_high), finite
    return aggregate(out_M, all_M, mb.seq_M.to(dev), args.aggregation), finite


def accumulate(tr, mbs: list[MicroBatch], rollout_t: dict[str, Tensor], score_t: dict[str, Tensor],
               scale: float) -> tuple[float, str | None]:
    """Forward and backward of every micro-batch, gradients summed in place; (the batch's loss, a problem)."""
    args = tr.args
    chunk = forward.chunk_positions(args.logit_chunk, tr.student.lm_head.out_features)
    units = sum(mb.units(args.aggregation) for mb in mbs)
    total, problem = 0.0, None
    for i, mb in enumerate(mbs):
        # DDP/FSDP reduce in the last micro-batch's backward only: every rank does exactly one.
        with _gradient_sync(tr.ddp, i == len(mbs) - 1):
            loss, finite = micro_loss(tr, mb, rollout_t, score_t, chunk)
            weight = mb.units(args.aggregation) / units if len(mbs) > 1 else 1.0
            loss = loss * weight * scale
            loss.backward()
        total += loss.item()
        if problem is None and not bool(finite):
            problem = "non-finite student logits"
        elif problem is None and not bool(torch.isfinite(loss)):
            problem = f"non-finite OPD loss ({loss.item()})"
    return total, problem


def _gradient_sync(wrapped, last: bool):
    """No gradient reduction before the last micro-batch: DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`
    (FSDP2 then keeps unsharded gradients until the last backward reduce-scatters their sum)."""
    if wrapped is None:
        return contextlib.nullcontext()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else wrapped.no_sync()


def update_step(tr, rollouts, scores: dict[str, Tensor], mask_BT: Tensor, step: int) -> float:
    """One optimizer step on the OPD loss of the masked positions; FloatingPointError on NaN/Inf."""
    args = tr.args
    scale = distributed.loss_scale(tr.dist, mask_BT, args.aggregation, f"step {step}: the {args.method!r} mask")
    mbs = match_ranks(tr, micro_batches(rollouts.sequences(), mask_BT, args.max_tokens_per_microbatch))
    rollout_t = {**rollouts.tensors, "tokens_N": rollouts.tensors["tokens_N"].long()}
    tr.student.train()
    tr.optimizer.zero_grad(set_to_none=True)
    loss, problem = accumulate(tr, mbs, rollout_t, scores, scale)
    distributed.raise_if_any(tr.dist, problem, f"at step {step}")  # every rank stops, none hangs
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.student.parameters(), 1.0)
    if not bool(torch.isfinite(grad_norm)):
        raise FloatingPointError(f"non-finite gradient norm at step {step}")
    tr.optimizer.step()
    tr.scheduler.step()
    tr.rollout_weights_stale = True
    return loss
