"""Token selectors of TA-OPD: which response positions get the OPD loss.

A selector scores every valid position of a rollout batch and keeps the best n = ⌈ρ·N_valid⌉ of
the WHOLE batch (not per sequence), so a sequence full of teachable tokens gets more of the budget.
Scores are built from the raw signals of `opd.math.teachability`, each first mapped to [0, 1] by the
batch-quantile Norm():

    ta_opd      s = D̃·C̃                    entropy   H̃
    kl          D̃                          c_only    C̃
    tip         H̃ + D̃ − H̃·D̃               ta_opd_ent H̃ + s − H̃·s  (code: s → Norm(D·C))
    random      uniform, seeded             full      every valid position

`a + b − a·b` is a soft OR of two [0, 1] scores: high when either is high.

Budget (`budget=`):
- "paper" (default): first reserve, in every sequence with a valid position, its best
  min(min_keep, N_b) positions by the selector's own score (min_keep = 1: "at least one per
  sequence"), then fill the rest of the n slots in global score order. The reserved positions
  count inside the budget, so the total is exactly n, unless there are more reserved positions
  than n (tiny ρ, many sequences): then all reserved positions are kept and the total exceeds n.
  With min_keep = 1 this equals "take the global top n, add each uncovered sequence's best
  position and drop the lowest-ranked positions of sequences that keep at least one".
- "code" (official TA-OPD code): take the global top n, then top up every sequence holding fewer
  than min_keep positions with its best remaining positions by the `ta_opd_ent` score, whatever
  the selector; the total can exceed n.
Ties (equal scores) go to the earlier position, then to the lower sample index: a stable sort on
the position-major layout of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from opd.math.teachability import normalise, teachability

SELECTORS = ("ta_opd", "entropy", "kl", "tip", "c_only", "ta_opd_ent", "random", "full")
ENT_VARIANTS = ("paper", "code")
BUDGETS = ("paper", "code")
RHO_TOLERANCE = 1e-9  # ceil(0.1 * 30) must be 3, not 4 (0.1 * 30 = 3.0000000000000004)


@dataclass(frozen=True)
class Signals:
    """Raw (un-normalised) per-position signals of one rollout batch, all shaped [B, T]; masks bool.

    `norm_mask_BT` is the code variant's mask for the Norm() quantiles (default: `valid_BT`).
    A selector only needs the signals its score uses.
    """

    valid_BT: Tensor
    entropy_BT: Tensor | None = None
    disagreement_BT: Tensor | None = None
    compatibility_BT: Tensor | None = None
    norm_mask_BT: Tensor | None = None


@dataclass(frozen=True)
class ScoreOptions:
    """How scores are built: `ent_variant` "paper" (H̃ ⊕ D̃·C̃) or "code" (H̃ ⊕ Norm(D·C)); Norm's q, eps.

    (⊕ is the soft OR a + b − a·b.)
    """

    ent_variant: str = "paper"
    q: float = 0.05
    eps: float = 1e-6


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def budget_size(rho: float, n_valid: int) -> int:
    """n = ⌈ρ·N_valid⌉, with ρ in (0, 1]; a float-rounding hair above an integer is not rounded up."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"selection ratio rho must be in (0, 1], got {rho}")
    return min(n_valid, math.ceil(rho * n_valid - RHO_TOLERANCE))


def _soft_or(a_BT: Tensor, b_BT: Tensor) -> Tensor:
    """a + b − a·b: the probabilistic OR of two [0, 1] scores."""
    return a_BT + b_BT - a_BT * b_BT


def _signal(signals: Signals, name: str) -> Tensor:
    raw_BT = getattr(signals, name)
    if raw_BT is None:
        raise ValueError(f"this selector needs the signal {name!r}, which was not given")
    return raw_BT


def _norm(raw_BT: Tensor, signals: Signals, options: ScoreOptions) -> Tensor:
    """Norm() of a raw [B, T] score, with the batch's quantile mask."""
    return normalise(raw_BT, signals.valid_BT, options.q, options.eps, signals.norm_mask_BT)


def _normed(signals: Signals, name: str, options: ScoreOptions) -> Tensor:
    """Norm() of one named raw signal: H̃, D̃ or C̃."""
    return _norm(_signal(signals, name), signals, options)


def _ta_opd(signals: Signals, options: ScoreOptions) -> Tensor:
    """s = D̃·C̃, the TA-OPD teachability."""
    d_norm_BT = _normed(signals, "disagreement_BT", options)
    return teachability(d_norm_BT, _normed(signals, "compatibility_BT", options))


def ta_opd_ent_score(signals: Signals, options: ScoreOptions = ScoreOptions()) -> Tensor:
    """H̃ + s − H̃·s with s = D̃·C̃ (paper) or s = Norm(D·C) (code: the raw product normalised)."""
    _check_choice(options.ent_variant, ENT_VARIANTS, "ta_opd_ent variant")
    if options.ent_variant == "paper":
        s_BT = _ta_opd(signals, options)
    else:
        raw_s_BT = _signal(signals, "disagreement_BT") * _signal(signals, "compatibility_BT")
        s_BT = _norm(raw_s_BT, signals, options)
    return _soft_or(_normed(signals, "entropy_BT", options), s_BT)


def selector_score(
    selector: str,
    signals: Signals,
    options: ScoreOptions = ScoreOptions(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """score_BT of a selector (higher = keep first); see the module docstring for the formulas."""
    _check_choice(selector, SELECTORS, "selector")
    if selector == "full":
        return signals.valid_BT.float()
    if selector == "random":
        return torch.rand(signals.valid_BT.shape, generator=generator)
    if selector == "ta_opd_ent":
        return ta_opd_ent_score(signals, options)
    if selector == "tip":
        return _soft_or(_normed(signals, "entropy_BT", options), _normed(signals, "disagreement_BT", options))
    if selector == "ta_opd":
        return _ta_opd(signals, options)
    single = {"entropy": "entropy_BT", "kl": "disagreement_BT", "c_only": "compatibility_BT"}
    return _normed(signals, single[selector], options)


def _rank_in_sequence(score_BT: Tensor, eligible_BT: Tensor) -> Tensor:
    """rank_BT: 0 = best eligible position of its sequence, ties to the earlier position; ineligible last."""
    key_BT = torch.where(eligible_BT, -score_BT.double(), torch.inf)
    order_BT = torch.sort(key_BT, dim=1, stable=True).indices
    rank_BT = torch.empty_like(order_BT)
    return rank_BT.scatter_(1, order_BT, torch.arange(key_BT.shape[1]).expand_as(order_BT))


def _global_order(score_BT: Tensor, valid_BT: Tensor) -> Tensor:
    """Flat (b·T + t) indices of the valid positions, best score first; ties → earlier t, then lower b."""
    B, T = score_BT.shape
    key_N = torch.where(valid_BT, -score_BT.double(), torch.inf).T.reshape(-1)  # position-major
    order_N = torch.sort(key_N, stable=True).indices[: int(valid_BT.sum())]
    return (order_N % B) * T + order_N // B


def _fill_budget(order_N: Tensor, taken_BT: Tensor, n: int) -> Tensor:
    """Add positions in `order_N` not yet taken until n are taken in all (never removes any)."""
    taken_N = taken_BT.reshape(-1).clone()
    free_N = ~taken_N[order_N]
    pick_N = free_N & (free_N.cumsum(0) <= max(n - int(taken_N.sum()), 0))
    taken_N[order_N[pick_N]] = True
    return taken_N.view_as(taken_BT)


def _top_up(mask_BT: Tensor, valid_BT: Tensor, score_BT: Tensor, min_keep: int) -> Tensor:
    """Give every sequence with < min_keep kept positions its best remaining valid ones (code budget)."""
    need_B = (min_keep - mask_BT.sum(1)).clamp_min(0)
    free_BT = valid_BT & ~mask_BT
    return mask_BT | (free_BT & (_rank_in_sequence(score_BT, free_BT) < need_B[:, None]))


def select_mask(
    selector: str,
    signals: Signals,
    rho: float,
    *,
    budget: str = "paper",
    min_keep: int = 1,
    options: ScoreOptions = ScoreOptions(),
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """mask_BT (bool, ⊆ valid_BT) of the positions that get the OPD loss.

    `random` draws from `generator`, or from a fresh torch.Generator seeded with `seed`, so a run
    is reproducible without touching the global RNG. `full` ignores the budget.
    """
    _check_choice(selector, SELECTORS, "selector")
    _check_choice(budget, BUDGETS, "budget")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    valid_BT = signals.valid_BT.bool()
    n = budget_size(rho, int(valid_BT.sum()))
    if selector == "full":
        return valid_BT.clone()
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    score_BT = selector_score(selector, signals, options, generator)
    if torch.isnan(score_BT[valid_BT]).any():
        raise ValueError(f"selector {selector!r} gave NaN scores at valid positions")
    order_N = _global_order(score_BT, valid_BT)
    if budget == "paper":
        reserved_BT = valid_BT & (_rank_in_sequence(score_BT, valid_BT) < min_keep)
        return _fill_budget(order_N, reserved_BT, n)
    mask_BT = _fill_budget(order_N, torch.zeros_like(valid_BT), n)
    return _top_up(mask_BT, valid_BT, ta_opd_ent_score(signals, options), min_keep)
