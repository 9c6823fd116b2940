"""FLOPs and bytes of one phase of a job, from a model's shape (opd.studies.shapes.Shape): pure arithmetic.

The counts are those of `torch.utils.flop_counter.FlopCounterMode` (tests/test_cost.py checks them on real
Qwen3 models): 2 FLOPs per multiply-add of every matrix product (the decoder layers' projections and the
LM head; embeddings, norms, rotary and softmax are not counted), attention's two products over the context
(4·q·context per query position and layer), a backward of 2x the forward's projections and 2.5x its
attention (the SDPA / flash-attention backward recomputes the scores: 5 products for 2). docs/cost.md
states the model and its assumptions.
"""

from __future__ import annotations

import dataclasses
import math

# Attention context per query position: "dense" = the full square (the trainer's Hugging Face forward with a
# padding mask; what FlopCounterMode counts for SDPA), "causal" = the lower triangle only (vLLM's kernels
# skip the masked blocks).
ATTENTION = ("dense", "causal")
ATTENTION_BACKWARD = 2.5  # SDPA/flash backward: dQ, dK, dV, dP and the recomputed scores, over the forward's 2
VLLM_MAX_SEQS = 256  # vLLM's default max_num_seqs: sequences decoded at once, whatever the KV budget


def layer_matmul_params(s) -> int:
    """Weights of one decoder layer's matrix products: q, k, v, o projections and the SwiGLU MLP."""
    H = s.hidden_size
    return 2 * H * s.q + 2 * H * s.kv + 3 * H * s.intermediate_size


def trunk_flops_per_token(s) -> int:
    return 2 * s.num_hidden_layers * layer_matmul_params(s)


def head_flops_per_position(s) -> int:
    return 2 * s.hidden_size * s.vocab_size


def attention_flops(s, length: int, attention: str = "dense", context: int = 0) -> float:
    """Attention's products for one sequence of `length` query positions after `context` earlier ones:
    4·q per (query, key) pair and layer; dense = every key of the padded square, causal = keys up to the query."""
    if attention not in ATTENTION:
        raise ValueError(f"attention: {attention!r}; allowed: {', '.join(ATTENTION)}")
    pairs = length * (context + length) if attention == "dense" else length * context + length * (length + 1) / 2
    return 4 * s.num_hidden_layers * s.q * pairs


def forward_flops(s, seqs: int, length: int, head_positions: int | None = None, attention: str = "dense") -> float:
    """A forward of `seqs` sequences of `length` tokens, the LM head at `head_positions` of each (default all)."""
    head = length if head_positions is None else head_positions
    return seqs * (length * trunk_flops_per_token(s) + head * head_flops_per_position(s)
                   + attention_flops(s, length, attention))


def recompute_flops(s, seqs: int, length: int, attention: str = "dense") -> float:
    """What checkpointing the decoder layers adds to a backward: each layer's forward again, less its last
    product (the MLP's down projection): torch's non-reentrant checkpoint stops recomputing once the
    tensors backward needs are back, and backward needs the down projection's input, not its output."""
    recomputed = 2 * s.num_hidden_layers * (layer_matmul_params(s) - s.hidden_size * s.intermediate_size)
    return seqs * (length * recomputed + attention_flops(s, length, attention))


def update_flops(s, seqs: int, length: int, head_positions: int | None = None, checkpointing: bool = False,
                 attention: str = "dense", head_checkpointed: bool = True) -> float:
    """Forward and backward (opd.engines.update): projections 1 + 2, attention 1 + 2.5, the LM head 1 + 2, +1
    when its chunks run under torch.utils.checkpoint (the engines' chunked head always does:
    opd.engines.forward.head_map), and with `checkpointing` the layers' recompute (`recompute_flops`)."""
    head = length if head_positions is None else head_positions
    linear = seqs * length * trunk_flops_per_token(s)
    att = seqs * attention_flops(s, length, attention)
    lm = seqs * head * head_flops_per_position(s)
    extra = recompute_flops(s, seqs, length, attention) if checkpointing else 0.0
    return 3 * linear + att * (1 + ATTENTION_BACKWARD) + lm * (3 + head_checkpointed) + extra


def kv_bytes_per_token(s, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token of context (Qwen3-1.7B in bf16: 112 KiB)."""
    return 2 * s.num_hidden_layers * s.kv * dtype_bytes


@dataclasses.dataclass(frozen=True)
class Decode:
    """Decoding `seqs` responses of `response` tokens after `prompt`-token prompts, memory-bound."""
    concurrent: int  # sequences decoded at once: the KV budget over one whole sequence's cache
    waves: int
    bytes: float  # weights once per decode step of each wave + each sequence's KV cache per step
    flops: float


def decode(s, seqs: int, prompt: int, response: int, kv_budget: float, weight_bytes: float,
           max_seqs: int = VLLM_MAX_SEQS, dtype_bytes: int = 2) -> Decode:
    """The decode model. concurrent = min(seqs, max_seqs, kv_budget // (kv per token x (prompt + response))):
    a sequence's whole cache is reserved (an upper bound: vLLM pages it in as it grows). Step t of a sequence
    (t = 0 .. response-1) reads prompt + t tokens of its cache; every step of a wave reads the weights once."""
    per_seq = kv_bytes_per_token(s, dtype_bytes) * (prompt + response)
    fit = max_seqs if per_seq == 0 or math.isinf(kv_budget) else int(kv_budget // per_seq)  # inf: hf generate
    if fit < 1:
        raise ValueError(f"a KV budget of {kv_budget / 2**30:.2f} GiB cannot hold one sequence of {prompt + response} "
                         f"tokens ({per_seq / 2**30:.2f} GiB)")
    concurrent = min(seqs, max_seqs, fit)
    waves = math.ceil(seqs / concurrent)
    context_reads = response * prompt + response * (response - 1) // 2  # Σ_t (prompt + t)
    kv = seqs * kv_bytes_per_token(s, dtype_bytes) * context_reads
    flops = seqs * (response * (trunk_flops_per_token(s) + head_flops_per_position(s))
                    + 4 * s.num_hidden_layers * s.q * context_reads)
    return Decode(concurrent, waves, waves * response * weight_bytes + kv, flops)


def weight_reads(params: float, seqs: int, length: int, max_tokens: int | None, passes: float = 1,
                 dtype_bytes: int = 2) -> float:
    """Bytes of weights a pass over `seqs` sequences reads: the weights once per micro-batch and pass, a
    micro-batch holding max(1, max_tokens // length) padded sequences (opd.engines.forward.token_batches)."""
    per_batch = max(1, (max_tokens or seqs * length) // length)
    return math.ceil(seqs / per_batch) * passes * dtype_bytes * params


def adam_bytes(params: float) -> float:
    """One AdamW step over fp32 state: read weights, gradients and two moments (16 B), write three (12 B)."""
    return 28 * params
