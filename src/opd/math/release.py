"""The release rule of "Prefix Teach, Suffix Fade": where to stop dense OPD supervision.

Per trajectory: the teacher margin m_t (`opd.teachability.teacher_margin`) is averaged over the
sentence segments of the decoded response; on that short series we test "no change" against
"one mean shift" (Gaussian, shared variance) with a BIC-style penalty and accept only a DOWNWARD
shift. The release point is the first token of the first segment after the shift: tokens before
it keep the OPD loss, the rest are released. No accepted shift → supervise the whole response.

Conventions chosen here (the papers are silent):
- Whitespace between sentences is attached to the PRECEDING segment (leading whitespace of the
  text to the first one), so segments tile the text. A token then belongs to the segment of its
  LAST character: a BPE token such as " The" (space first) opens the next sentence, ". " or
  ".\\n" closes the previous one. Zero-width tokens (specials) join the previous token's segment.
- σ² in the penalty defaults to the residual variance of the one-change fit,
  cost_one / (n − 2) (unbiased: two means fitted); "mad" is a robust option, a float a known σ².
"""

from __future__ import annotations

import dataclasses
import math
import re
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # imported where they are used: a run that never applies the release rule (e.g.
    import ruptures as rpt  # benchmarks/gpu_smoke.py with method `full`) needs neither installed
    from nltk.tokenize.punkt import PunktSentenceTokenizer

Span = tuple[int, int]

# Lower case, no final period: Punkt's convention for abbreviation types.
ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "fig", "eq", "cf", "al", "approx", "resp", "ref", "sec")
SIGMA2_ESTIMATES = ("residual", "mad")
MAD_TO_SIGMA = 1.4826  # σ ≈ 1.4826 · MAD for Gaussian data


@lru_cache(maxsize=1)
def _punkt() -> PunktSentenceTokenizer:
    """An untrained Punkt with explicit abbreviations: no nltk.download, works offline."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[Span]:
    """Character spans [start, end) of the sentence segments; they tile [0, len(text)) exactly.

    Newlines split first (Punkt never splits on a bare newline, and math chains of thought put
    one step per line), then Punkt splits each line; decimals (3.5) and the listed abbreviations
    (e.g., i.e.) do not end a sentence. Whitespace-only text is one segment; "" gives [].
    """
    if not text:
        return []
    starts = []
    for line in re.finditer(r"[^\n]+", text):
        body = line.group()
        for a, b in _punkt().span_tokenize(body):  # a segment starts at its first visible character
            starts.append(line.start() + a + len(body[a:b]) - len(body[a:b].lstrip()))
    bounds = [0, *starts[1:], len(text)]  # the text's leading whitespace joins the first segment
    return list(zip(bounds[:-1], bounds[1:]))


def token_spans(char_spans: Sequence[Span], token_offsets: Sequence[Span]) -> list[Span]:
    """Token index spans [start, end) of the segments; they cover all T tokens in order, none empty.

    `token_offsets[i]` = (start, end) characters of response token i in the decoded text. A token
    goes to the segment holding its last character (see the module docstring); a segment that no
    token falls in is merged into its neighbour, so there may be fewer token spans than segments.
    """
    T = len(token_offsets)
    if T == 0:
        return []
    seg_starts = [a for a, _ in char_spans]
    seg_of, current = [], 0
    for start, end in token_offsets:
        if end > start:  # zero-width tokens keep the previous segment
            current = max(current, bisect_right(seg_starts, end - 1) - 1)  # monotone, clamped at 0
        seg_of.append(current)
    cuts = [i for i in range(1, T) if seg_of[i] != seg_of[i - 1]]
    bounds = [0, *cuts, T]
    return list(zip(bounds[:-1], bounds[1:]))


def segment_means(values_T: Tensor | Sequence[float], spans: Sequence[Span]) -> np.ndarray:
    """Mean of the per-token values over each token span: the series the change-point test sees."""
    values = np.asarray(torch.as_tensor(values_T, dtype=torch.float64))
    return np.array([values[a:b].mean() for a, b in spans], dtype=np.float64)


def _best_single_change(cost: rpt.costs.CostL2, n: int, first: int) -> tuple[int, float]:
    """argmin over k in [first, n) of the l2 cost of [0, k) + [k, n); ties to the earlier k.

    Exhaustive, like rpt.Dynp(model="l2", n_bkps=1, min_size=1, jump=1), but restricted to
    k ≥ first so that a release never comes before the minimum prefix.
    """
    costs = [(cost.error(0, k) + cost.error(k, n), k) for k in range(first, n)]
    best_cost, best_k = min(costs)
    return best_k, best_cost


@dataclass(frozen=True)
class ReleaseRule:
    """The release rule's settings, defined once: the defaults here are those of the config schema."""
    lam: float = 2.0  # BIC penalty multiplier λ
    min_segments: int = 3  # fewest segments for a change-point test
    min_prefix_segments: int = 1  # segments always supervised before a release
    sigma2: str | float = "residual"  # σ² estimate: "residual", "mad", or a known variance

    def __post_init__(self) -> None:
        if isinstance(self.sigma2, str) and self.sigma2 not in SIGMA2_ESTIMATES:
            try:
                object.__setattr__(self, "sigma2", float(self.sigma2))
            except ValueError:
                raise ValueError(f"sigma2 must be {' or '.join(SIGMA2_ESTIMATES)} or a number, "
                                 f"got {self.sigma2!r}") from None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `find_release` / `release_token_index`."""
        return dataclasses.asdict(self)


def _sigma2(series: np.ndarray, cost_one: float, sigma2: str | float) -> float | None:
    """Noise variance for the penalty; None when it cannot be estimated (too few points)."""
    if not isinstance(sigma2, str):
        return float(sigma2)
    if sigma2 not in SIGMA2_ESTIMATES:
        allowed = ", ".join(SIGMA2_ESTIMATES)
        raise ValueError(f"unknown sigma2 estimate {sigma2!r}; allowed: {allowed} or a float")
    n = len(series)
    if sigma2 == "residual":  # shared variance of the one-change model, 2 means fitted
        return cost_one / (n - 2) if n > 2 else None
    diffs = np.diff(series)  # differences cancel the level; the one shift is one outlier among them
    mad = np.median(np.abs(diffs - np.median(diffs)))
    return (MAD_TO_SIGMA * mad) ** 2 / 2.0  # Var(x_{i+1} − x_i) = 2σ²


def find_release(
    seg_means: Sequence[float] | np.ndarray,
    lam: float = ReleaseRule.lam,
    min_segments: int = ReleaseRule.min_segments,
    min_prefix_segments: int = ReleaseRule.min_prefix_segments,
    sigma2: str | float = ReleaseRule.sigma2,
) -> int | None:
    """Index of the first segment after an accepted DOWNWARD mean shift, or None.

    With the l2 cost (sum of squared deviations from the segment mean, −2·log-likelihood · σ²
    up to a constant) the BIC prefers one change when
        cost_no_change − cost_one_change > λ·σ²·log n,
    λ = 2 counting the two extra parameters (the second mean and the change location); ruptures
    has no BIC of its own. We additionally require mean(after) < mean(before): the rule releases
    where the teacher's margin COLLAPSES, never where it grows; the best split is found whatever
    its direction, and an upward best split means no release (no second search for a smaller drop).
    The change index k must leave at least `min_prefix_segments` segments before it.
    σ² (`sigma2`): "residual" = cost_one / (n − 2), undefined for n = 2 → None; "mad" =
    (1.4826·MAD of first differences)² / 2, robust to the shift itself; or a known float.
    A series shorter than max(min_segments, 2), or with a NaN/inf, gives None.
    """
    series = np.asarray(seg_means, dtype=np.float64)
    n = len(series)
    first = max(min_prefix_segments, 1)
    if n < max(min_segments, 2) or first >= n or not np.isfinite(series).all():
        return None
    import ruptures as rpt

    cost = rpt.costs.CostL2().fit(series)
    k, cost_one = _best_single_change(cost, n, first)
    noise = _sigma2(series, cost_one, sigma2)
    if noise is None:
        return None
    gain = cost.error(0, n) - cost_one
    goes_down = series[k:].mean() < series[:k].mean()
    return k if goes_down and gain > lam * noise * math.log(n) else None


def release_token_index(
    margins_T: Tensor | Sequence[float],
    text: str,
    token_offsets: Sequence[Span],
    **find_kwargs: Any,
) -> int | None:
    """Release token index of one trajectory (first token of the first segment after the drop), or None.

    `margins_T` holds the teacher margin of each of the T response tokens (valid positions only),
    `text` the decoded response and `token_offsets` each token's characters in it. `find_kwargs`
    go to `find_release` (lam, min_segments, min_prefix_segments, sigma2). An empty response or
    one with a single segment gives None: supervise everything.
    """
    if len(token_offsets) != len(margins_T):
        raise ValueError(f"{len(margins_T)} margins but {len(token_offsets)} token offsets")
    if not text or len(token_offsets) == 0:
        return None
    spans = token_spans(split_sentences(text), token_offsets)
    k = find_release(segment_means(margins_T, spans), **find_kwargs)
    return None if k is None else spans[k][0]


def release_mask(valid_BT: Tensor, release_idx_B: Sequence[int | None]) -> Tensor:
    """mask_BT of the supervised positions: valid and before the release (all valid when None).

    Release indices count response positions from 0, as `valid_BT`'s second axis does.
    """
    B, T = valid_BT.shape
    if len(release_idx_B) != B:
        raise ValueError(f"{len(release_idx_B)} release indices for a batch of {B}")
    limit_B = torch.tensor([T if idx is None else idx for idx in release_idx_B], dtype=torch.long)
    return valid_BT.bool() & (torch.arange(T)[None, :] < limit_B[:, None])
