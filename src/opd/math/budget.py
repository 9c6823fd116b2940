"""The selection budget: how many positions a selector keeps, and which, given its scores.

n = ⌈ρ·N_valid⌉ over the WHOLE batch (not per sequence). Two rules (`opd.math.select` documents both):
- "paper": every sequence first reserves its best min_keep positions by the selector's own score, the rest
  of the n slots go in global score order (the total is n unless the reserved positions alone exceed it);
  ρ·N is rounded down by 1e-9 before the ceiling, so 0.07 × 100 = 7.000000000000001 keeps 7;
- "official" (TA-OPD's code): ⌈ρ·N⌉ exactly as float64 computes it, no tolerance (0.07 × 100 keeps 8),
  the global top n, then every sequence with fewer than min_keep positions is topped up by another
  score (the caller passes the `ta_opd_ent` score); the total can exceed n.
Ties (equal scores) go to the earlier position, then to the lower sample index: a stable sort on the
position-major layout of the batch.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

BUDGETS = ("paper", "official")
RHO_TOLERANCE = 1e-9  # paper budget: 0.07 * 100 = 7.000000000000001 keeps 7, not 8
OFFICIAL_RANDOM_BASE = 42  # the official code's random.Random(42 + rollout_counter)


def budget_size(rho: float, n_valid: int, budget: str = "paper") -> int:
    """n = ⌈ρ·N_valid⌉ for ρ in (0, 1]: "paper" ignores a float-rounding hair above an integer, "official" not."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"selection ratio rho must be in (0, 1], got {rho}")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; allowed: {', '.join(BUDGETS)}")
    tolerance = RHO_TOLERANCE if budget == "paper" else 0.0
    return min(n_valid, math.ceil(rho * n_valid - tolerance))


def rank_in_sequence(score_BT: Tensor, eligible_BT: Tensor) -> Tensor:
    """rank_BT: 0 = best eligible position of its sequence, ties to the earlier position; ineligible last."""
    key_BT = torch.where(eligible_BT, -score_BT.double(), torch.inf)
    order_BT = torch.sort(key_BT, dim=1, stable=True).indices
    rank_BT = torch.empty_like(order_BT)
    return rank_BT.scatter_(1, order_BT, torch.arange(key_BT.shape[1]).expand_as(order_BT))


def global_order(score_BT: Tensor, valid_BT: Tensor) -> Tensor:
    """Flat (b·T + t) indices of the valid positions, best score first; ties → earlier t, then lower b."""
    B, T = score_BT.shape
    key_N = torch.where(valid_BT, -score_BT.double(), torch.inf).T.reshape(-1)  # position-major
    order_N = torch.sort(key_N, stable=True).indices[: int(valid_BT.sum())]
    return (order_N % B) * T + order_N // B


def fill_budget(order_N: Tensor, taken_BT: Tensor, n: int) -> Tensor:
    """Add positions in `order_N` not yet taken until n are taken in all (never removes any)."""
    taken_N = taken_BT.reshape(-1).clone()
    free_N = ~taken_N[order_N]
    pick_N = free_N & (free_N.cumsum(0) <= max(n - int(taken_N.sum()), 0))
    taken_N[order_N[pick_N]] = True
    return taken_N.view_as(taken_BT)


def top_up(mask_BT: Tensor, valid_BT: Tensor, score_BT: Tensor, min_keep: int) -> Tensor:
    """Give every sequence with < min_keep kept positions its best remaining valid ones (official budget)."""
    need_B = (min_keep - mask_BT.sum(1)).clamp_min(0)
    free_BT = valid_BT & ~mask_BT
    return mask_BT | (free_BT & (rank_in_sequence(score_BT, free_BT) < need_B[:, None]))


def budget_mask(score_BT: Tensor, valid_BT: Tensor, n: int, min_keep: int, budget: str,
                top_up_score_BT: Tensor | None = None) -> Tensor:
    """mask_BT of the kept positions under `budget` ("official" tops up by `top_up_score_BT`)."""
    order_N = global_order(score_BT, valid_BT)
    if budget == "paper":
        reserved_BT = valid_BT & (rank_in_sequence(score_BT, valid_BT) < min_keep)
        return fill_budget(order_N, reserved_BT, n)
    mask_BT = fill_budget(order_N, torch.zeros_like(valid_BT), n)
    return top_up(mask_BT, valid_BT, score_BT if top_up_score_BT is None else top_up_score_BT, min_keep)


def official_random_score(valid_BT: Tensor, rollout_counter: int) -> Tensor:
    """score_BT replaying the official random selector's draw: higher = earlier in its shuffle.

    The official code lists the valid positions in row-major order (sequence by sequence), shuffles that
    list with `random.Random(42 + rollout_counter)` and keeps the first n. Shuffling the indices 0..N−1
    with the same generator gives the same permutation; scoring the i-th shuffled position N − i makes the
    global top n exactly those first n (the scores are distinct, so the tie rule never applies).
    """
    flat_N = valid_BT.reshape(-1).nonzero()[:, 0]  # row-major: b-major, then t
    order = list(range(len(flat_N)))
    random.Random(OFFICIAL_RANDOM_BASE + rollout_counter).shuffle(order)
    score_N = torch.zeros(valid_BT.numel(), dtype=torch.float64)
    score_N[flat_N[torch.tensor(order, dtype=torch.long)]] = torch.arange(len(order), 0, -1, dtype=torch.float64)
    return score_N.view(valid_BT.shape)
