"""Hand-checked tests of the selectors and the budget (expected masks worked out in comments)."""

import pytest
import torch

from opd.math.select import SELECTORS, ScoreOptions, Signals, budget_size, select_mask, selector_score

T_, F_ = True, False
MINMAX = ScoreOptions(quantiles=(0.0, 1.0), eps=0.0)  # Norm = (z - min) / (max - min): easy to do by hand


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float)


def _picked(mask: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(ix) for ix in mask.nonzero().tolist()]


# One sequence, five positions, all valid. With min-max Norm:
#   H = (.2, .6, 1, .4, .6)    -> H~ = (0, .5, 1, .25, .5)
#   D = (0, 2, 4, 3, 1)        -> D~ = (0, .5, 1, .75, .25)
#   C = (.9, .5, .1, .7, .3)   -> C~ = (1, .5, 0, .75, .25)
FIVE = Signals(
    valid_BT=torch.ones(1, 5, dtype=torch.bool),
    entropy_BT=_t([[0.2, 0.6, 1.0, 0.4, 0.6]]),
    disagreement_BT=_t([[0, 2, 4, 3, 1]]),
    compatibility_BT=_t([[0.9, 0.5, 0.1, 0.7, 0.3]]),
)


@pytest.mark.parametrize(
    "selector, expected",
    [
        ("ta_opd", [1, 3]),  # s = D~C~ = (0, .25, 0, .5625, .0625): t3, t1
        ("entropy", [1, 2]),  # H~: t2 = 1, then t1 = t4 = .5 tie -> earlier t1
        ("kl", [2, 3]),  # D~: t2 = 1, t3 = .75
        ("tip", [2, 3]),  # H~+D~-H~D~ = (0, .75, 1, .8125, .625)
        ("c_only", [0, 3]),  # C~: t0 = 1, t3 = .75
        ("ta_opd_ent", [2, 3]),  # H~+s-H~s = (0, .625, 1, .671875, .53125)
    ],
)
def test_each_scored_selector_keeps_its_top_two(selector, expected):
    # rho = .4, N = 5 -> n = ceil(2) = 2
    mask = select_mask(selector, FIVE, 0.4, options=MINMAX)
    assert [t for _, t in _picked(mask)] == expected


def test_ta_opd_ent_code_variant_normalises_the_raw_product():
    # D = (11, 12, 10, 10) -> D~ = (.5, 1, 0, 0); C = (.5, .3, 1, 0) -> C~ = C; H constant -> H~ = 0.
    # Paper: s = D~C~ = (.25, .3, 0, 0) -> t1.  Code: D*C = (5.5, 3.6, 10, 0) -> Norm -> t2 best.
    sig = Signals(
        valid_BT=torch.ones(1, 4, dtype=torch.bool),
        entropy_BT=torch.full((1, 4), 0.5),
        disagreement_BT=_t([[11, 12, 10, 10]]),
        compatibility_BT=_t([[0.5, 0.3, 1.0, 0.0]]),
    )
    paper = select_mask("ta_opd_ent", sig, 0.25, options=MINMAX)
    code = select_mask("ta_opd_ent", sig, 0.25, options=ScoreOptions(ent_variant="norm_dc", quantiles=(0.0, 1.0), eps=0.0))
    assert _picked(paper) == [(0, 1)]
    assert _picked(code) == [(0, 2)]


# Two sequences; sequence 1 has padding at t = 2, 3 (holding a large 5.0 that must be ignored).
VALID = torch.tensor([[T_, T_, T_, T_], [T_, T_, F_, F_]])


def test_budget_is_ceil_rho_n_over_the_whole_batch():
    # Valid D: .9 .1 .5 .3 | .8 .2 -> order .9 (0,0), .8 (1,0), .5 (0,2), ...; N = 6, rho = .5 -> n = 3.
    sig = Signals(VALID, disagreement_BT=_t([[0.9, 0.1, 0.5, 0.3], [0.8, 0.2, 5.0, 5.0]]))
    assert _picked(select_mask("kl", sig, 0.5)) == [(0, 0), (0, 2), (1, 0)]
    assert budget_size(0.1, 30) == 3  # 0.1 * 30 is exactly 3.0 in floating point
    assert budget_size(0.05, 41) == 3  # ceil(2.05)


def test_at_least_one_per_sequence_inside_the_budget():
    # Valid D: .9 .1 .5 .3 | .2 .15 -> the global top 3 are all in sequence 0 (.9, .5, .3).
    # Paper budget: reserve each sequence's best ((0,0) = .9, (1,0) = .2), fill 1 more: (0,2) = .5.
    # Total 3 = n.
    sig = Signals(VALID, disagreement_BT=_t([[0.9, 0.1, 0.5, 0.3], [0.2, 0.15, 5.0, 5.0]]))
    assert _picked(select_mask("kl", sig, 0.5)) == [(0, 0), (0, 2), (1, 0)]


def test_code_budget_tops_up_with_ta_opd_ent_and_can_exceed_n():
    # Code budget: global top 3 = (0,0), (0,2), (0,3); sequence 1 has none -> top up with its best by
    # ta_opd_ent. C is constant -> C~ = 0 -> s = 0, so ta_opd_ent = H~; H peaks at (1,1), not at kl's (1,0).
    sig = Signals(
        VALID,
        entropy_BT=_t([[0.1, 0.2, 0.3, 0.4], [0.5, 0.9, 0.0, 0.0]]),
        disagreement_BT=_t([[0.9, 0.1, 0.5, 0.3], [0.2, 0.15, 5.0, 5.0]]),
        compatibility_BT=torch.ones(2, 4),
    )
    mask = select_mask("kl", sig, 0.5, budget="official")
    assert _picked(mask) == [(0, 0), (0, 2), (0, 3), (1, 1)]  # 4 > n = 3


def test_ties_go_to_the_earlier_position_then_the_lower_sample():
    # D = 1 at (0,0) (0,2) (1,0) (1,1), else 0; N = 8, rho = .375 -> n = 3.
    # Reserved: (0,0), (1,0). Next, tie between (0,2) and (1,1): earlier position t=1 wins -> (1,1).
    sig = Signals(torch.ones(2, 4, dtype=torch.bool), disagreement_BT=_t([[1, 0, 1, 0], [1, 1, 0, 0]]))
    assert _picked(select_mask("kl", sig, 0.375)) == [(0, 0), (1, 0), (1, 1)]
    # Same position tie: D = 1 at (0,0) (0,1) (1,0) (1,1); after the reserved (0,0), (1,0) the tie
    # between (0,1) and (1,1) goes to the lower sample -> (0,1). The code budget (no reserve) agrees.
    sig = Signals(torch.ones(2, 4, dtype=torch.bool), disagreement_BT=_t([[1, 1, 0, 0], [1, 1, 0, 0]]))
    expected = [(0, 0), (0, 1), (1, 0)]
    assert _picked(select_mask("kl", sig, 0.375)) == expected
    full = Signals(sig.valid_BT, torch.zeros(2, 4), sig.disagreement_BT, torch.ones(2, 4))
    assert _picked(select_mask("kl", full, 0.375, budget="official")) == expected


def test_reserved_positions_win_over_a_tiny_budget():
    # Three sequences of 2 valid positions, rho = .1 -> n = ceil(.6) = 1, but each keeps its best: 3.
    sig = Signals(torch.ones(3, 2, dtype=torch.bool), disagreement_BT=_t([[0, 1], [2, 3], [5, 4]]))
    assert _picked(select_mask("kl", sig, 0.1)) == [(0, 1), (1, 1), (2, 0)]


def test_random_is_seeded_and_full_keeps_every_valid_position():
    sig = Signals(VALID)
    a = select_mask("random", sig, 0.5, seed=7)
    assert torch.equal(a, select_mask("random", sig, 0.5, seed=7))
    assert int(a.sum()) == 3 and not (a & ~VALID).any() and a.any(1).all()
    assert torch.equal(select_mask("full", sig, 1.0), VALID)


def test_validation():
    sig = Signals(VALID, disagreement_BT=torch.zeros(2, 4))
    for rho in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rho"):
            select_mask("kl", sig, rho)
    with pytest.raises(ValueError, match="ta_opd_ent"):
        select_mask("bogus", sig, 0.5)
    with pytest.raises(ValueError, match="entropy_BT"):
        selector_score("entropy", sig)
    assert SELECTORS == ("ta_opd", "entropy", "kl", "tip", "c_only", "ta_opd_ent", "dincompat_high", "random", "full")
