"""Hand-checked tests of the TA-OPD signals and the teacher margin (numbers worked out in comments)."""

import math

import pytest
import torch

from opd.math.teachability import (
    compatibility,
    full_entropy,
    local_disagreement,
    normalise,
    reverse_kl_sampled,
    student_entropy,
    teachability,
    teacher_margin,
)


def _lp(*probs: float) -> torch.Tensor:
    """log of a probability row, shaped [B=1, T=1, K]."""
    return torch.tensor(probs, dtype=torch.float64).log().view(1, 1, -1)


def _ids(*ids: int) -> torch.Tensor:
    return torch.tensor(ids).view(1, 1, -1)


# A K=2 position with one shared id: S_K = [5, 7], T_K = [7, 9], U = {5, 7, 9}.
#   p_S(5)=.5  p_S(7)=.3  p_S(9)=.1      p_T(5)=.2  p_T(7)=.4  p_T(9)=.3
SHARED = dict(
    s_topk_ids_BTK=_ids(5, 7),
    s_topk_logprobs_BTK=_lp(0.5, 0.3),
    t_topk_ids_BTK=_ids(7, 9),
    t_topk_logprobs_BTK=_lp(0.4, 0.3),
    t_on_s_logprobs_BTK=_lp(0.2, 0.4),
    s_on_t_logprobs_BTK=_lp(0.3, 0.1),
)


def test_identical_distributions_give_zero_disagreement():
    # Same p on {0, 1, 2} for both (p = .5, .3, .2); S_K = [0, 1], T_K = [0, 2]: exact D = 0.
    # The top-K-only code variant gives 0 when the two top-K lists coincide (with different lists its
    # zero-probability floor makes D > 0 even for identical distributions).
    kw = dict(
        s_topk_ids_BTK=_ids(0, 1), s_topk_logprobs_BTK=_lp(0.5, 0.3),
        t_topk_ids_BTK=_ids(0, 2), t_topk_logprobs_BTK=_lp(0.5, 0.2),
        t_on_s_logprobs_BTK=_lp(0.5, 0.3), s_on_t_logprobs_BTK=_lp(0.5, 0.2),
    )
    assert local_disagreement(**kw, mode="exact").item() == pytest.approx(0.0, abs=1e-7)
    same_ids = dict(kw, t_topk_ids_BTK=_ids(0, 1), t_topk_logprobs_BTK=_lp(0.5, 0.3))
    assert local_disagreement(**same_ids, mode="topk").item() == pytest.approx(0.0, abs=1e-7)


def test_two_token_forward_kl_by_hand():
    # K=1: S_K = {0}, T_K = {1}, U = {0, 1}.  p_S = (.6, .2) -> (.75, .25); p_T = (.3, .6) -> (1/3, 2/3).
    # KL(T||S) = 1/3 ln((1/3)/.75) + 2/3 ln((2/3)/.25) = 1/3 ln(4/9) + 2/3 ln(8/3)
    #          = 1/3 (-0.810930) + 2/3 (0.980829) = 0.383576
    # (the reverse direction would be .75 ln 2.25 + .25 ln .375 = 0.362990, so the test pins the direction)
    d = local_disagreement(
        _ids(0), _lp(0.6), _ids(1), _lp(0.6), t_on_s_logprobs_BTK=_lp(0.3), s_on_t_logprobs_BTK=_lp(0.2)
    )
    assert d.item() == pytest.approx(0.383576, abs=1e-5)


def test_disagreement_counts_a_shared_id_once():
    # Exact: p_S on U = (.5, .3, .1)/.9 = (5, 3, 1)/9; p_T = (.2, .4, .3)/.9 = (2, 4, 3)/9.
    # KL(T||S) = 2/9 ln(2/5) + 4/9 ln(4/3) + 3/9 ln 3 = -0.203620 + 0.127859 + 0.366204 = 0.290443
    assert local_disagreement(**SHARED).item() == pytest.approx(0.290443, abs=1e-5)


def test_disagreement_topk_mode_floors_missing_tokens():
    # Code mode: teacher knows only T_K -> p_T on (5, 7, 9) = (0, .4, .3) -> (0, 4/7, 3/7);
    # student knows only S_K -> (.5, .3, 0) -> (5/8, 3/8, 0), the 0 floored at 1e-12.
    # KL = 4/7 ln((4/7)/(3/8)) + 3/7 (ln(3/7) - ln 1e-12) = 4/7 (0.421213) + 3/7 (-0.847298 + 27.631021)
    #    = 0.240693 + 11.478738 = 11.719431
    d = local_disagreement(**SHARED, mode="topk")
    assert d.item() == pytest.approx(11.719431, abs=1e-4)


def test_disagreement_default_mode_is_topk_without_student_on_teacher_ids():
    kw = {k: v for k, v in SHARED.items() if k != "s_on_t_logprobs_BTK"}
    assert local_disagreement(**kw).item() == pytest.approx(11.719431, abs=1e-4)
    with pytest.raises(ValueError, match="exact"):
        local_disagreement(**kw, mode="exact")


def test_compatibility_exact_vs_lower_bound():
    # Exact: p_T(5) + p_T(7) = .2 + .4 = .6.  Lower bound: only S_K ∩ T_K = {7} -> .4.
    c_exact = compatibility(SHARED["s_topk_ids_BTK"], SHARED["t_on_s_logprobs_BTK"])
    c_low = compatibility(
        SHARED["s_topk_ids_BTK"], None, SHARED["t_topk_ids_BTK"], SHARED["t_topk_logprobs_BTK"], mode="topk"
    )
    assert c_exact.item() == pytest.approx(0.6, abs=1e-6)
    assert c_low.item() == pytest.approx(0.4, abs=1e-6)


def test_entropy_uniform_topk_is_one_and_zero_mass_is_safe():
    # Uniform over K=4: ln 4 / ln 4 = 1.  (.5, .5, 0) over K=3: ln 2 / ln 3 = 0.693147/1.098612 = 0.630930.
    assert student_entropy(_lp(0.1, 0.1, 0.1, 0.1)).item() == pytest.approx(1.0, abs=1e-6)
    assert student_entropy(_lp(0.5, 0.5, 0.0)).item() == pytest.approx(0.630930, abs=1e-5)
    # Full vocabulary, 4 equal logits: ln 4 = 1.386294 nats.
    assert full_entropy(torch.zeros(1, 1, 4)).item() == pytest.approx(1.386294, abs=1e-5)


def test_normalise_linear_quantiles_and_padding():
    # Valid values 0..9 (n = 10); position 5 of each row is padding holding 100.
    # torch.quantile (linear): Q.05 at rank .05*9 = .45 -> 0.45; Q.95 at rank 8.55 -> 8.55; range 8.1.
    z = torch.tensor([[0, 1, 2, 3, 4, 100], [5, 6, 7, 8, 9, 100]], dtype=torch.float)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[:, 5] = False
    out = normalise(z, valid)
    assert out[0, 0].item() == 0.0  # below Q.05: clipped
    assert out[0, 1].item() == pytest.approx(0.55 / 8.1, abs=1e-5)  # 0.067901
    assert out[1, 0].item() == pytest.approx(4.55 / 8.1, abs=1e-5)  # 0.561728
    assert out[1, 4].item() == 1.0  # above Q.95: clipped
    assert out[:, 5].tolist() == [0.0, 0.0]  # padding
    # Code variant: quantiles over all 12 entries (padding counted): sorted 0..9, 100, 100;
    # Q.05 at rank .55 -> 0.55, Q.95 at rank 10.45 -> 100; 5 -> 4.45/99.45 = 0.044746.
    code = normalise(z, valid, eps=0.0, count_mask_BT=torch.ones_like(valid))
    assert code[1, 0].item() == pytest.approx(4.45 / 99.45, abs=1e-6)


def test_normalise_degenerate_range_maps_to_zero():
    z = torch.full((1, 4), 3.0)
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert normalise(z, valid, eps=0.0).tolist() == [[0.0] * 4]
    assert normalise(z, valid).tolist() == [[0.0] * 4]


def test_teachability_is_the_product():
    # .5*.4 = .2, 1*.2 = .2, 0*.9 = 0
    s = teachability(torch.tensor([0.5, 1.0, 0.0]), torch.tensor([0.4, 0.2, 0.9]))
    assert s.tolist() == pytest.approx([0.2, 0.2, 0.0])


def test_teacher_margin_definitions():
    # Teacher on the student's top-3 (student top-1 first): p_T = (.1, .6, .2).
    lp = _lp(0.1, 0.6, 0.2)
    assert teacher_margin(lp).item() == pytest.approx(math.log(3), abs=1e-5)  # ln(.6/.2) = 1.098612
    assert teacher_margin(lp, "prob_top2").item() == pytest.approx(0.4, abs=1e-6)  # .6 - .2
    assert teacher_margin(lp, "vs_student_top1").item() == pytest.approx(math.log(6), abs=1e-5)  # ln(.6/.1)
    with pytest.raises(ValueError, match="top2"):
        teacher_margin(lp, "nope")


def test_reverse_kl_sampled():
    # ln .5 - ln .25 = ln 2 = 0.693147
    r = reverse_kl_sampled(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]]))
    assert r.item() == pytest.approx(0.693147, abs=1e-5)
