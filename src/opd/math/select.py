"""Token selectors of TA-OPD: which response positions get the OPD loss.

A selector scores every valid position of a rollout batch and keeps the best n = ⌈ρ·N_valid⌉ of
the WHOLE batch (not per sequence), so a sequence full of teachable tokens gets more of the budget.
Scores are built from the raw signals of `opd.math.teachability`, each first mapped to [0, 1] by the
batch-quantile Norm() (`opd.math.normalise`):

    ta_opd      s = D̃·C̃                    entropy   H̃
    kl          D̃                          c_only    C̃
    tip         H̃ + D̃ − H̃·D̃               ta_opd_ent H̃ + s − H̃·s  (official: s → Norm(D·C))
    dincompat_high  D̃·(1 − C̃)  (the official code's "incompatible disagreement")
    random      uniform: a seeded torch.Generator, or the official code's random.Random(42 + counter) stream
    full        every valid position

`a + b − a·b` is a soft OR of two [0, 1] scores: high when either is high.

Budget (`budget=`, `opd.math.budget`):
- "paper" (default): first reserve, in every sequence with a valid position, its best
  min(min_keep, N_b) positions by the selector's own score (min_keep = 1: "at least one per
  sequence"), then fill the rest of the n slots in global score order. The reserved positions
  count inside the budget, so the total is exactly n, unless there are more reserved positions
  than n (tiny ρ, many sequences): then all reserved positions are kept and the total exceeds n.
  With min_keep = 1 this equals "take the global top n, add each uncovered sequence's best
  position and drop the lowest-ranked positions of sequences that keep at least one".
- "official" (official TA-OPD code): n = ⌈ρ·N⌉ with float64's exact rounding, the global top n, then
  top up every sequence holding fewer than min_keep positions with its best remaining positions by the
  `ta_opd_ent` score, whatever the selector; the total can exceed n.
Ties (equal scores) go to the earlier position, then to the lower sample index: a stable sort on
the position-major layout of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opd.math.budget import BUDGETS, budget_mask, budget_size, official_random_score
from opd.math.normalise import normalise
from opd.math.teachability import teachability

SELECTORS = ("ta_opd", "entropy", "kl", "tip", "c_only", "ta_opd_ent", "dincompat_high", "random", "full")
ENT_VARIANTS = ("dnorm_cnorm", "norm_dc")
RANDOM_STREAMS = ("torch", "official")


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
    """How scores are built: `ent_variant` "dnorm_cnorm" (paper: H̃ ⊕ D̃·C̃) or "norm_dc" (official code:
    H̃ ⊕ Norm(D·C)); Norm's mode ("quantile" or "none"), quantile pair and eps. (⊕: the soft OR a + b − a·b.)
    """

    ent_variant: str = "dnorm_cnorm"
    quantiles: tuple[float, float] = (0.05, 0.95)
    eps: float = 1e-6
    normalisation: str = "quantile"


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


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
    return normalise(raw_BT, signals.valid_BT, options.quantiles, options.eps, signals.norm_mask_BT,
                     options.normalisation)


def _normed(signals: Signals, name: str, options: ScoreOptions) -> Tensor:
    """Norm() of one named raw signal: H̃, D̃ or C̃."""
    return _norm(_signal(signals, name), signals, options)


def _ta_opd(signals: Signals, options: ScoreOptions) -> Tensor:
    """s = D̃·C̃, the TA-OPD teachability."""
    d_norm_BT = _normed(signals, "disagreement_BT", options)
    return teachability(d_norm_BT, _normed(signals, "compatibility_BT", options))


def ta_opd_ent_score(signals: Signals, options: ScoreOptions = ScoreOptions()) -> Tensor:
    """H̃ + s − H̃·s with s = D̃·C̃ (paper) or s = Norm(D·C) (official code: the raw product normalised)."""
    _check_choice(options.ent_variant, ENT_VARIANTS, "ta_opd_ent variant")
    if options.ent_variant == "dnorm_cnorm":
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
    random_stream: str = "torch",
    rollout_counter: int = 0,
) -> Tensor:
    """score_BT of a selector (higher = keep first); see the module docstring for the formulas."""
    _check_choice(selector, SELECTORS, "selector")
    if selector == "full":
        return signals.valid_BT.float()
    if selector == "random":
        _check_choice(random_stream, RANDOM_STREAMS, "random stream")
        if random_stream == "official":
            return official_random_score(signals.valid_BT.bool(), rollout_counter)
        return torch.rand(signals.valid_BT.shape, generator=generator)
    if selector == "dincompat_high":
        return _normed(signals, "disagreement_BT", options) * (1 - _normed(signals, "compatibility_BT", options))
    if selector == "ta_opd_ent":
        return ta_opd_ent_score(signals, options)
    if selector == "tip":
        return _soft_or(_normed(signals, "entropy_BT", options), _normed(signals, "disagreement_BT", options))
    if selector == "ta_opd":
        return _ta_opd(signals, options)
    single = {"entropy": "entropy_BT", "kl": "disagreement_BT", "c_only": "compatibility_BT"}
    return _normed(signals, single[selector], options)


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
    random_stream: str = "torch",
    rollout_counter: int = 0,
) -> Tensor:
    """mask_BT (bool, ⊆ valid_BT) of the positions that get the OPD loss.

    `random` draws from `generator`, or from a fresh torch.Generator seeded with `seed`, so a run
    is reproducible without touching the global RNG; `random_stream="official"` replays the official
    code's `random.Random(42 + rollout_counter)` shuffle instead. `full` ignores the budget.
    """
    _check_choice(selector, SELECTORS, "selector")
    _check_choice(budget, BUDGETS, "budget")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    valid_BT = signals.valid_BT.bool()
    n = budget_size(rho, int(valid_BT.sum()), budget)
    if selector == "full":
        return valid_BT.clone()
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    score_BT = selector_score(selector, signals, options, generator, random_stream, rollout_counter)
    if torch.isnan(score_BT[valid_BT]).any():
        raise ValueError(f"selector {selector!r} gave NaN scores at valid positions")
    top_up_BT = ta_opd_ent_score(signals, options) if budget == "official" and min_keep > 0 else None
    return budget_mask(score_BT, valid_BT, n, min_keep, budget, top_up_BT)
