"""Hand-checked tests of the release rule: sentence segments, token spans, the change point."""

import re

import numpy as np
import pytest
import torch

from opd.math.release import (
    find_release,
    release_mask,
    release_token_index,
    segment_means,
    split_sentences,
    token_spans,
)


def _pieces(text: str, spans) -> list[str]:
    return [text[a:b] for a, b in spans]


def _word_offsets(text: str) -> list[tuple[int, int]]:
    """A stand-in tokenizer: one token per word with its leading whitespace (like BPE's 'Ġword')."""
    return [(m.start(), m.end()) for m in re.finditer(r"\s*\S+", text)]


def _tiles(spans, length: int) -> bool:
    return spans[0][0] == 0 and spans[-1][1] == length and all(
        a < b and b == c for (a, b), (c, _) in zip(spans, spans[1:] + [(length, None)])
    )


def test_sentences_keep_abbreviations_and_decimals_and_split_newlines():
    text = "  We use e.g. the rule. It is 3.5 times 2, i.e. 7.  Next one!\n\nAnd fig. 2 vs. eq. 3 here. "
    spans = split_sentences(text)
    assert _pieces(text, spans) == [
        "  We use e.g. the rule. ",  # leading whitespace joins the first segment
        "It is 3.5 times 2, i.e. 7.  ",  # whitespace after a sentence joins it
        "Next one!\n\n",
        "And fig. 2 vs. eq. 3 here. ",
    ]
    assert _tiles(spans, len(text))
    offsets = _word_offsets(text)
    tokens = token_spans(spans, offsets)
    assert _tiles(tokens, len(offsets)) and len(tokens) == 4
    # the word tokens carry their leading space, so the second token span starts with " It"
    assert [text[offsets[a][0]:offsets[b - 1][1]] for a, b in tokens][1] == " It is 3.5 times 2, i.e. 7."
    lines = "Seven plus five is 12.\n12 times 2 is 24\nThe answer is 24."  # no period on line 2
    expected = ["Seven plus five is 12.\n", "12 times 2 is 24\n", "The answer is 24."]
    assert _pieces(lines, split_sentences(lines)) == expected


def test_sentences_edge_cases():
    assert split_sentences("") == []
    assert split_sentences("   ") == [(0, 3)]
    assert split_sentences("no boundary here") == [(0, 16)]


def test_token_spans_follow_the_last_character_of_each_token():
    text = "Add 3.5 now. Then stop.\nDone."
    # segments: "Add 3.5 now. " [0,13), "Then stop.\n" [13,24), "Done." [24,29)
    offsets = [(0, 3), (3, 5), (5, 7), (7, 11), (11, 12),  # "Add" " 3" ".5" " now" "."
               (12, 17), (17, 22), (22, 24),  # " Then" (last char 'n' at 16: segment 1) " stop" ".\n"
               (24, 28), (28, 29), (29, 29)]  # "Done" "." and a zero-width EOS (stays with "." )
    spans = split_sentences(text)
    assert spans == [(0, 13), (13, 24), (24, 29)]
    assert token_spans(spans, offsets) == [(0, 5), (5, 8), (8, 11)]


def test_a_segment_without_tokens_is_merged():
    # Token 1 spans chars 3..8, ending inside segment 2: segment 1 gets no token and disappears.
    assert token_spans([(0, 4), (4, 8), (8, 12)], [(0, 3), (3, 9), (9, 12)]) == [(0, 1), (1, 3)]
    assert token_spans([], [(0, 0)]) == [(0, 1)]
    assert token_spans([(0, 3)], []) == []


def test_segment_means():
    # (1+2)/2 = 1.5, 3, (4+5+6)/3 = 5
    assert segment_means(torch.arange(1.0, 7.0), [(0, 2), (2, 3), (3, 6)]).tolist() == [1.5, 3.0, 5.0]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_planted_noiseless_drop_is_found_at_k(k):
    # [2]*k + [0]*(6-k): the one-change fit at k has cost 0, so sigma^2 = 0 and any gain is accepted.
    assert find_release([2.0] * k + [0.0] * (6 - k)) == k


def test_planted_noisy_drop():
    # x = 3.1 2.9 3.0 | 1.1 0.9 1.0.  Split at 3: means 3 and 1, cost_one = .02 + .02 = .04.
    # No change: mean 2, cost = 1.21+.81+1+.81+1.21+1 = 6.04; gain = 6.0.
    # residual sigma^2 = .04/(6-2) = .01; penalty 2 * .01 * ln 6 = .0358 < 6 -> release at 3.
    x = [3.1, 2.9, 3.0, 1.1, 0.9, 1.0]
    assert find_release(x) == 3
    # MAD of differences: diffs (-.2, .1, -1.9, -.2, .1), median -.2, |dev| (0, .3, 1.7, 0, .3), MAD .3;
    # sigma^2 = (1.4826 * .3)^2 / 2 = .0989; penalty 2 * .0989 * ln 6 = .354 < 6 -> still 3.
    assert find_release(x, sigma2="mad") == 3


def test_flat_upward_and_short_series_give_none():
    assert find_release([1.0] * 6) is None  # gain 0 is not > 0
    assert find_release([1.0, 1.0, 1.0, 3.0, 3.0, 3.0]) is None  # a rise is never a release
    assert find_release([]) is None and find_release([1.0]) is None
    assert find_release([1.0, 0.0]) is None  # residual sigma^2 needs n > 2
    # with a known sigma^2 = .01: gain .5 > 2 * .01 * ln 2 = .0139 -> release at 1
    assert find_release([1.0, 0.0], sigma2=0.01) is None  # fewer than min_segments = 3
    assert find_release([1.0, 0.0], sigma2=0.01, min_segments=2) == 1
    assert find_release([2.0, 2.0, 0.0], min_segments=4) is None


def test_lambda_controls_acceptance():
    # x = 1.0 1.2 1.0 1.2 | 0.8 1.0 0.8 1.0 (n = 8). Best split at 4 (means 1.1, .9):
    # cost_one = .04 + .04 = .08;
    # no change (mean 1): cost = 4 * .04 = .16; gain = .08; sigma^2 = .08/6 = .013333; gain/sigma^2 = 6.
    # (splits at 2, 3, 5 cost .133, .139, .139, all above .08)
    # Accept iff 6 > lambda * ln 8 = lambda * 2.0794: lambda = .5 -> 1.04 yes; 2 -> 4.16 yes; 10 -> 20.8 no.
    x = [1.0, 1.2, 1.0, 1.2, 0.8, 1.0, 0.8, 1.0]
    assert find_release(x, lam=0.5) == 4
    assert find_release(x, lam=2.0) == 4
    assert find_release(x, lam=10.0) is None


def test_minimum_prefix():
    # x = 3 1 1 1 1 1: the drop is at 1. With min_prefix_segments = 2 the best allowed split is k = 2
    # ([3,1] mean 2, cost 2; k = 3 would cost 24/9); no change: mean 4/3, cost 3.333; gain 1.333;
    # sigma^2 = 2/4 = .5; penalty 2 * .5 * ln 6 = 1.79 > 1.333 -> None.
    x = [3.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert find_release(x) == 1
    assert find_release(x, min_prefix_segments=2) is None


SIX = (
    "Step one is fine. Step two is fine. Step three is fine. "
    "Step four now fades. Step five now fades. Step six now fades."
)


def test_release_token_index_end_to_end():
    # Six sentences of four word-tokens each; margin 2 on the first three, .5 after:
    # segment means 2 2 2 .5 .5 .5 -> change at segment 3 -> its first token, 3 * 4 = 12 (" Step").
    offsets = _word_offsets(SIX)
    assert len(offsets) == 24
    margins = torch.tensor([2.0] * 12 + [0.5] * 12)
    assert release_token_index(margins, SIX, offsets) == 12
    assert release_token_index(torch.ones(24), SIX, offsets) is None  # flat


def test_release_token_index_without_boundary_or_text():
    text = "one long thought without any end"
    margins = torch.tensor([3.0, 3.0, 0.1, 0.1, 0.1, 0.1])
    assert release_token_index(margins, text, _word_offsets(text)) is None
    assert release_token_index(torch.tensor([]), "", []) is None


def test_release_mask():
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    mask = release_mask(valid, [2, None])
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert isinstance(segment_means([1.0], [(0, 1)]), np.ndarray)
