"""The student's or teacher's forward pass at response positions: the LM head only where a token is predicted.

Shared by teacher scoring, the training update, DDP's wrapped forward and the fixed-context bank, so
it sits below all of them (no engine imports another engine's stage module for it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def response_logits(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                    keep_N: Tensor | None = None) -> Tensor:
    """logits_NV at the positions that predict each response token (flat, in rollout order).

    Runs the trunk over the whole sequence but the LM head only on the N response positions (or on
    the subset `keep_N` of them): with a 150k vocabulary the [B, L, V] logits tensor would dominate
    memory, and positions without a loss need no logits at all.
    """
    pad = model.config.pad_token_id or 0
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    L = max(map(len, seqs))
    input_ids_BL = torch.tensor([s + [pad] * (L - len(s)) for s in seqs])  # right padding
    attn_BL = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    hidden_BLH = model.model(input_ids=input_ids_BL.to(model.device),
                             attention_mask=attn_BL.to(model.device)).last_hidden_state
    rows = torch.tensor([b for b, r in enumerate(response_ids) for _ in r], dtype=torch.long)
    cols = torch.tensor([len(p) - 1 + j for p, r in zip(prompt_ids, response_ids) for j in range(len(r))],
                        dtype=torch.long)
    if keep_N is not None:
        rows, cols = rows[keep_N.cpu()], cols[keep_N.cpu()]
    return model.lm_head(hidden_BLH[rows, cols])
