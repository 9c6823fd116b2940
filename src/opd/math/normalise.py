"""Norm(): the batch-quantile map of a raw per-position signal to [0, 1], in the paper's and the code's forms."""

from __future__ import annotations

import torch
from torch import Tensor

MIN_RANGE = 1e-12  # Norm(): a denominator below this maps everything to 0 (code variant, eps=0)
NORMALISATIONS = ("quantile", "none")


def _out_dtype(z_BT: Tensor) -> torch.dtype:
    """float64 signals stay float64 (the official variant); anything else comes out float32 as it always has."""
    return torch.float64 if z_BT.dtype == torch.float64 else torch.float32


def normalise(
    z_BT: Tensor,
    valid_BT: Tensor,
    quantiles: tuple[float, float] = (0.05, 0.95),
    eps: float = 1e-6,
    count_mask_BT: Tensor | None = None,
    mode: str = "quantile",
) -> Tensor:
    """Norm(z) = clip((z − Q_lo) / (Q_hi − Q_lo + eps), 0, 1), 0 at invalid positions.

    Quantiles (torch.quantile, linear interpolation, in float64) are taken over the whole batch so that
    signals of different scales (nats, probabilities) can be combined. Paper: over `valid_BT`, (lo, hi) =
    (0.05, 0.95), eps = 1e-6. Official code: `count_mask_BT` (every response position, also those that
    cannot be selected) sets the quantiles, eps = 0, and a pair may be asymmetric (e.g. 0.1 / 1.0); a
    denominator below 1e-12 (an all-equal batch, say) then maps everything to 0. `mode="none"`: the
    official code's "no normalisation", which is not the raw values: each value over the batch maximum,
    z / max(max z, 1e-12), clipped to [0, 1], the maximum taken over the positions the quantiles would use
    (`count_mask_BT`, else `valid_BT`); 0 at invalid positions.
    """
    if mode not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {mode!r}; allowed: {', '.join(NORMALISATIONS)}")
    lo_q, hi_q = quantiles
    if not 0.0 <= lo_q < hi_q <= 1.0:
        raise ValueError(f"quantiles must satisfy 0 <= lo < hi <= 1, got ({lo_q}, {hi_q})")
    dtype = _out_dtype(z_BT)
    count_BT = valid_BT if count_mask_BT is None else count_mask_BT
    vals = z_BT[count_BT].double()
    if vals.numel() == 0:
        return torch.zeros_like(z_BT, dtype=dtype)
    if mode == "none":
        top = max(vals.max().item(), MIN_RANGE)
        return torch.where(valid_BT, (z_BT.double() / top).clamp(0.0, 1.0).to(dtype), 0.0)
    lo, hi = torch.quantile(vals, torch.tensor([lo_q, hi_q], dtype=torch.double)).tolist()
    denom = hi - lo + eps
    if denom < MIN_RANGE:
        return torch.zeros_like(z_BT, dtype=dtype)
    out_BT = ((z_BT.double() - lo) / denom).clamp(0.0, 1.0).to(dtype)
    return torch.where(valid_BT, out_BT, 0.0)
