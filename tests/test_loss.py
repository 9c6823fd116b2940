import math

import pytest
import torch

from opd.loss import aggregate, forward_kl_full, opd_loss, ppo_clip_terms, reverse_kl_advantage


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
