import math

import pytest
import torch

from opd.math.loss import aggregate, forward_kl_full, opd_loss, ppo_clip_terms, reverse_kl_advantage


def test_identical_models_give_zero_loss_and_zero_gradient():
    logits = torch.randn(5, 7, requires_grad=True)
    new = torch.log_softmax(logits, -1)[:, 0]
    old = new.detach().clone()
    loss = opd_loss(new, old, t_logprob_N=old.clone(), mask_N=torch.ones(5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_advantage_is_minus_sampled_reverse_kl():
    # log p_S = log 0.5, log p_T = log 0.25 -> A = log 0.25 - log 0.5 = -log 2
    a = reverse_kl_advantage(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert a.item() == pytest.approx(-math.log(2))


def test_ppo_clip_by_hand():
    # ratio = e^{0.5} = 1.6487; with A = +1 the clipped term (1.2) wins the min: loss = -1.2
    # with A = -1: min(-1.6487, -1.2) = -1.6487 -> loss = +1.6487 (no clipping of a worsening move)
    new, old = torch.tensor([0.5, 0.5]), torch.tensor([0.0, 0.0])
    terms = ppo_clip_terms(new, old, torch.tensor([1.0, -1.0]), clip_eps=0.2)
    assert terms.tolist() == pytest.approx([-1.2, math.exp(0.5)])


def test_aggregation_token_vs_sequence_mean():
    loss = torch.tensor([1.0, 3.0, 5.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    seq = torch.tensor([0, 0, 1, 1])
    assert aggregate(loss, mask, how="token_mean").item() == pytest.approx(3.0)  # (1+3+5)/3
    assert aggregate(loss, mask, seq, how="sequence_mean").item() == pytest.approx(3.5)  # (2 + 5)/2
    assert aggregate(loss, torch.zeros(4, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="allowed: token_mean, sequence_mean"):
        aggregate(loss, mask, how="sum")


def test_forward_kl_full_by_hand():
    p_t = torch.tensor([[0.5, 0.5]]).log()
    p_s = torch.tensor([[0.25, 0.75]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert forward_kl_full(p_t, p_s).item() == pytest.approx(expected)
    assert forward_kl_full(p_t, p_t).item() == pytest.approx(0.0)


def _two_token_case():
    # vocabulary of 3; student p_S = (0.5, 0.25, 0.25); teacher on ids (0, 1) has p_T = (0.2, 0.6)
    s_logp = torch.tensor([[0.5, 0.25, 0.25]]).log()
    ids = torch.tensor([[0, 1]])
    t_lp = torch.tensor([[0.2, 0.6]]).log()
    return s_logp, ids, t_lp


def test_topk_reverse_kl_by_hand():
    from opd.math.loss import topk_reverse_kl

    s_logp, ids, t_lp = _two_token_case()
    # renormalised on {0, 1}: p̄_S = (2/3, 1/3), p̄_T = (1/4, 3/4)
    expected = (2 / 3) * math.log((2 / 3) / 0.25) + (1 / 3) * math.log((1 / 3) / 0.75)
    assert topk_reverse_kl(s_logp, ids, t_lp).item() == pytest.approx(expected, rel=1e-5)
    assert topk_reverse_kl(s_logp, ids, s_logp[:, :2]).item() == pytest.approx(0.0, abs=1e-6)


def test_topk_forward_kl_and_jsd_by_hand():
    from opd.math.loss import topk_forward_kl, topk_jsd

    s_logp, ids, t_lp = _two_token_case()
    s, t = (2 / 3, 1 / 3), (0.25, 0.75)
    fkl = t[0] * math.log(t[0] / s[0]) + t[1] * math.log(t[1] / s[1])
    assert topk_forward_kl(s_logp, ids, t_lp).item() == pytest.approx(fkl, rel=1e-5)
    m = tuple(0.5 * a + 0.5 * b for a, b in zip(t, s))
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(t, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(s, m))
    assert topk_jsd(s_logp, ids, t_lp).item() == pytest.approx(jsd, rel=1e-5)
    with pytest.raises(ValueError, match="beta"):
        topk_jsd(s_logp, ids, t_lp, beta=1.0)


def test_distribution_losses_have_gradients_only_through_the_student():
    from opd.math.loss import topk_reverse_kl

    logits = torch.zeros(1, 3, requires_grad=True)
    _, ids, t_lp = _two_token_case()
    topk_reverse_kl(torch.log_softmax(logits, -1), ids, t_lp).backward()
    assert logits.grad.abs().sum() > 0 and logits.grad[0, 2].item() == pytest.approx(0.0, abs=1e-7)
