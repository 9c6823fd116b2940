"""The default memory bounds of a forward pass, in plain Python: read by the engines (opd.engines.forward)
and by the memory planner (opd.studies.plan, which must not import torch), so both use one default."""

from __future__ import annotations

# Default chunk (logit_chunk = None): as many positions as make this many bytes of float32 logits, i.e.
# 441 positions at Qwen3's vocabulary (about 0.95 GB at the update's peak of ~14 bytes per logit, see
# docs/training.md) and 131,072 at the miniature world's 512, whose batches (at most 50,688 positions,
# the fixed-context bank) are then never split. 2**29 (883 positions) left the update and scoring at
# 0.23x the unchunked code at 4k tokens (benchmarks/memory_scaling.py), above the 0.2x target.
CHUNK_BYTES = 2**28
# Padded tokens per forward pass: one paper-scale sequence (prompt + 8,192 new tokens) with room to spare;
# the Qwen3-1.7B update with gradient checkpointing needs about 8 GB of activations for it (docs/training.md).
DEFAULT_MAX_TOKENS = 16384


def chunk_positions(logit_chunk: int | None, vocab: int) -> int:
    """Positions per LM-head chunk: `logit_chunk`, or the CHUNK_BYTES default for this vocabulary."""
    if logit_chunk is None:
        return max(1, CHUNK_BYTES // (4 * vocab))
    if logit_chunk < 1:
        raise ValueError(f"--logit-chunk (train.logit_chunk / diagnose.logit_chunk) must be >= 1, got {logit_chunk}")
    return logit_chunk
