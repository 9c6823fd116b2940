"""The student's or teacher's forward pass at response positions, with the LM head run a chunk at a time.

Shared by teacher scoring, the training update, DDP's wrapped forward and the fixed-context bank, so
it sits below all of them (no engine imports another engine's stage module for it).

Memory: with a 151,936-token vocabulary a [1, V] float32 row is 0.61 MB, so no [positions, V] tensor may
exist beyond one chunk of `chunk` positions. `response_hidden` runs the trunk and keeps only the hidden
states [M, H] at the positions that predict a response token; `head_map` then runs the LM head, the
float32 log-softmax and a reduction `fn` (sampled-token logprob, top-K, logprobs at given ids, a
distribution loss) over `chunk` rows at a time and keeps only what `fn` returns. With gradients, each
chunk runs under `torch.utils.checkpoint`: its [chunk, V] activations are freed after the forward and
recomputed (bit-identically) when backward reaches that chunk, so one chunk's worth lives at a time.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from opd.infra.memory import DEFAULT_MAX_TOKENS, chunk_positions  # noqa: F401 (the engines' import of them)

BUDGET_FLAG = "--max-tokens-per-microbatch (train.max_tokens_per_microbatch / diagnose.max_tokens_per_microbatch)"


def response_hidden(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                    keep_N: Tensor | None = None) -> Tensor:
    """hidden_MH: the trunk's last hidden states at the positions that predict each response token.

    Flat in rollout order over the N response tokens, or over the subset `keep_N` of them. The trunk runs
    over the whole (right-padded) sequence; positions without a loss never reach the LM head.
    """
    pad = model.config.pad_token_id or 0
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    L = max(map(len, seqs))
    input_ids_BL = torch.tensor([s + [pad] * (L - len(s)) for s in seqs])
    attn_BL = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    hidden_BLH = model.model(input_ids=input_ids_BL.to(model.device),
                             attention_mask=attn_BL.to(model.device)).last_hidden_state
    rows = torch.tensor([b for b, r in enumerate(response_ids) for _ in r], dtype=torch.long)
    cols = torch.tensor([len(p) - 1 + j for p, r in zip(prompt_ids, response_ids) for j in range(len(r))],
                        dtype=torch.long)
    if keep_N is not None:
        rows, cols = rows[keep_N.cpu()], cols[keep_N.cpu()]
    return hidden_BLH[rows, cols]


def token_batches(lengths: list[int], max_tokens: int | None, max_seqs: int | None = None,
                  flag: str = "the token budget") -> list[list[int]]:
    """Consecutive runs of indices, each at most `max_seqs` long and at most `max_tokens` padded tokens.

    Padded: the trunk pads a batch to its longest sequence, so n·L_max is what its activations cost. A
    sequence longer than `max_tokens` alone is an error naming `flag`.
    """
    groups, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        if max_tokens is not None and n > max_tokens:
            raise ValueError(f"a sequence of {n} tokens (prompt + response) does not fit {flag} = {max_tokens}: "
                             f"raise it to at least {n}")
        grown = max(longest, n)
        if cur and ((max_seqs is not None and len(cur) >= max_seqs)
                    or (max_tokens is not None and grown * (len(cur) + 1) > max_tokens)):
            groups.append(cur)
            cur, grown = [], n
        cur.append(i)
        longest = grown
    return groups + ([cur] if cur else [])


def _chunk_outputs(lm_head, fn: Callable, h_CH: Tensor, *per_pos_C: Tensor) -> tuple[Tensor, ...]:
    """fn's outputs on one chunk, plus whether the chunk's logits were all finite."""
    logits_CV = lm_head(h_CH)
    # All finite <=> max and min finite (max/min propagate NaN): no [chunk, V] bool temporary, which at
    # 4-32 MiB is served from glibc's heap and fragments it (measured: +1.2 GB peak at 220-position chunks).
    if logits_CV.numel() == 0:  # an empty batch (no supervised position): aminmax has nothing to reduce
        finite = torch.ones(1, dtype=torch.bool, device=logits_CV.device)
    else:
        lo_hi = torch.aminmax(logits_CV.detach())
        finite = (torch.isfinite(lo_hi.min) & torch.isfinite(lo_hi.max)).reshape(1)
    return (*fn(torch.log_softmax(logits_CV.float(), dim=-1), *per_pos_C), finite)


def head_map(lm_head, hidden_MH: Tensor, fn: Callable[..., tuple[Tensor, ...]], per_pos: tuple[Tensor, ...],
             chunk: int) -> tuple[tuple[Tensor, ...], Tensor]:
    """(fn's outputs concatenated over positions, all-logits-finite flag), `chunk` positions at a time.

    fn(logp_CV, *per_pos_C) -> tuple of tensors with the chunk's positions first; `per_pos` are tensors
    with one row per position (ids, stored logprobs), sliced with each chunk.
    """
    per_pos = tuple(x.to(hidden_MH.device) for x in per_pos)
    parts = []
    for lo in range(0, max(1, hidden_MH.shape[0]), chunk):
        args = (hidden_MH[lo:lo + chunk], *(x[lo:lo + chunk] for x in per_pos))
        if torch.is_grad_enabled() and hidden_MH.requires_grad:
            parts.append(checkpoint(_chunk_outputs, lm_head, fn, *args, use_reentrant=False))
        else:
            parts.append(_chunk_outputs(lm_head, fn, *args))
    outs = tuple(torch.cat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(len(parts[0]) - 1))
    return outs, torch.stack([p[-1][0] for p in parts]).all()


def supervised_map(model, prompts: list[list[int]], responses: list[list[int]], keep_N: Tensor | None,
                   fn: Callable[..., tuple[Tensor, ...]], per_pos: tuple[Tensor, ...], chunk: int):
    """`head_map` of fn over the kept response positions of these sequences (the trunk, then the chunked head)."""
    return head_map(model.lm_head, response_hidden(model, prompts, responses, keep_N), fn, per_pos, chunk)


# Reductions for head_map (each returns a tuple; logp_CV is the float32 log-softmax of one chunk).

def sampled_logprob(logp_CV: Tensor, tokens_C: Tensor) -> tuple[Tensor]:
    """log p(y_t) of the sampled token."""
    return (logp_CV.gather(-1, tokens_C.long()[:, None])[:, 0],)


def logprobs_at(logp_CV: Tensor, ids_CK: Tensor) -> tuple[Tensor]:
    """log p at the given ids (e.g. the other model's top-K)."""
    return (logp_CV.gather(-1, ids_CK.long()),)


def enable_checkpointing(model) -> None:
    """transformers' activation checkpointing of every decoder layer, non-reentrant (it works under DDP/FSDP
    and with the chunked head's own checkpoints); the recomputation is the same arithmetic."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def load_model(path, device: torch.device, dtype: torch.dtype):
    """A Hugging Face causal LM in `dtype` on `device`, in eval mode (the diagnostics' models)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """The memory bounds of a forward pass (opd.engines.forward), shared by scoring, training and the diagnostics."""
    p.add_argument("--logit-chunk", type=int, default=None,
                   help="positions per LM-head chunk (no [positions, V] tensor beyond it); default: 256 MiB of "
                        "float32 logits (441 positions at V = 151,936)")
    p.add_argument("--max-tokens-per-microbatch", type=int, default=DEFAULT_MAX_TOKENS,
                   help="padded tokens (prompt + response) per forward pass; a longer sequence is an error")


def check_memory_args(args: argparse.Namespace) -> None:
    if args.logit_chunk is not None:
        chunk_positions(args.logit_chunk, 1)  # raises, naming the flag, on a chunk <= 0
    if args.max_tokens_per_microbatch < 2:
        raise ValueError(f"--max-tokens-per-microbatch must hold one prompt plus one token (>= 2), "
                         f"got {args.max_tokens_per_microbatch}")

