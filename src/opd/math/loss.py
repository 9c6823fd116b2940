"""The OPD loss of both papers' trainers, as pure functions on flat per-token tensors.

Sampled-token reverse KL as an advantage: A_t = −(log p_S^old(y_t) − log p_T(y_t)), i.e. minus the
single-sample estimate of KL(p_S ‖ p_T) (REVERSE KL: student first) at position t. It enters a
PPO-clip policy-gradient loss on the supervised (masked) positions only:

    ratio_t = exp(log p_S^new(y_t) − log p_S^old(y_t))
    ℓ_t = −min(ratio_t · A_t, clip(ratio_t, 1 − ε, 1 + ε_high) · A_t)

ε_high = ε (symmetric, the default) or DAPO's clip-higher (`train.clip_eps_high`, e.g. 0.28 with ε = 0.2 in
TA-OPD's launch script): a positive-advantage token keeps its gradient up to a ratio of 1 + ε_high.

Aggregation: `token_mean` = Σ m_t ℓ_t / Σ m_t over the whole batch (the papers); `sequence_mean` = the
mean over sequences of each sequence's token mean (the official TA-OPD code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "sequence_mean")


def reverse_kl_advantage(old_logprob_N: Tensor, t_logprob_N: Tensor) -> Tensor:
    """A_t = log p_T(y_t) − log p_S^old(y_t): positive where the teacher likes the sampled token more."""
    return (t_logprob_N - old_logprob_N).detach()


def ppo_clip_terms(new_logprob_N: Tensor, old_logprob_N: Tensor, advantage_N: Tensor, clip_eps: float,
                   clip_eps_high: float | None = None) -> Tensor:
    """Per-token PPO-clip loss ℓ_t (to minimise); the ratio clipped to [1 − clip_eps, 1 + clip_eps_high]
    (clip_eps_high None: clip_eps, the symmetric clip)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if high < clip_eps:
        raise ValueError(f"clip_eps_high {high} < clip_eps {clip_eps}: the upper clip must not be below the lower one")
    ratio_N = torch.exp(new_logprob_N - old_logprob_N.detach())
    clipped_N = torch.clamp(ratio_N, 1.0 - clip_eps, 1.0 + high)
    return -torch.minimum(ratio_N * advantage_N, clipped_N * advantage_N)


def aggregate(loss_N: Tensor, mask_N: Tensor, seq_index_N: Tensor | None = None,
              how: str = "token_mean") -> Tensor:
    """Masked mean of per-token losses; 0 (with a gradient path) when nothing is supervised."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; allowed: {', '.join(AGGREGATIONS)}")
    m_N = mask_N.to(loss_N.dtype)
    if how == "token_mean":
        return (loss_N * m_N).sum() / m_N.sum().clamp(min=1.0)
    if seq_index_N is None:
        raise ValueError("sequence_mean needs seq_index_N (the sequence of each token)")
    n_seq = int(seq_index_N.max()) + 1 if seq_index_N.numel() else 0
    num_S = loss_N.new_zeros(n_seq).index_add(0, seq_index_N, loss_N * m_N)
    den_S = loss_N.new_zeros(n_seq).index_add(0, seq_index_N, m_N)
    has_S = den_S > 0
    if not bool(has_S.any()):
        return (loss_N * m_N).sum()
    return (num_S[has_S] / den_S[has_S]).mean()


def opd_loss(new_logprob_N: Tensor, old_logprob_N: Tensor, t_logprob_N: Tensor, mask_N: Tensor,
             clip_eps: float = 0.2, how: str = "token_mean", seq_index_N: Tensor | None = None,
             clip_eps_high: float | None = None) -> Tensor:
    """The OPD objective on the masked positions (sampled-token reverse KL advantage, PPO-clip)."""
    advantage_N = reverse_kl_advantage(old_logprob_N, t_logprob_N)
    terms_N = ppo_clip_terms(new_logprob_N, old_logprob_N, advantage_N, clip_eps, clip_eps_high)
    return aggregate(terms_N, mask_N, seq_index_N, how)


def forward_kl_full(t_logp_NV: Tensor, s_logp_NV: Tensor) -> Tensor:
    """KL(p_T ‖ p_S) per position over the full vocabulary (FORWARD KL: teacher first)."""
    return (t_logp_NV.exp() * (t_logp_NV - s_logp_NV)).sum(-1)


# Distribution-matching options (not the papers' default). They use what the scores store — the
# teacher's logprobs on the student's top-K ids and the teacher's own top-K — and the CURRENT student's
# full log-probs at the supervised positions, each side renormalised on the id set.


def _renormalise(logp_MK: Tensor) -> Tensor:
    return logp_MK - torch.logsumexp(logp_MK, dim=-1, keepdim=True)


def topk_reverse_kl(s_logp_MV: Tensor, s_topk_ids_MK: Tensor, t_on_s_logprobs_MK: Tensor) -> Tensor:
    """KL(p̄_S ‖ p̄_T) on the student's top-K ids (REVERSE KL: student first), per position."""
    s_MK = _renormalise(s_logp_MV.gather(-1, s_topk_ids_MK.long()))
    t_MK = _renormalise(t_on_s_logprobs_MK.to(s_MK.dtype))
    return (s_MK.exp() * (s_MK - t_MK)).sum(-1)


def topk_forward_kl(s_logp_MV: Tensor, t_topk_ids_MK: Tensor, t_topk_logprobs_MK: Tensor) -> Tensor:
    """KL(p̄_T ‖ p̄_S) on the teacher's top-K ids (FORWARD KL: teacher first), per position."""
    s_MK = _renormalise(s_logp_MV.gather(-1, t_topk_ids_MK.long()))
    t_MK = _renormalise(t_topk_logprobs_MK.to(s_MK.dtype))
    return (t_MK.exp() * (t_MK - s_MK)).sum(-1)


def topk_jsd(s_logp_MV: Tensor, t_topk_ids_MK: Tensor, t_topk_logprobs_MK: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD on the teacher's top-K ids: β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m), m = β p_T + (1 − β) p_S.

    β → 0 approaches forward KL's behaviour, β → 1 reverse KL's (the GKD convention); β = 0.5 is the JSD.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    s_MK = _renormalise(s_logp_MV.gather(-1, t_topk_ids_MK.long()))
    t_MK = _renormalise(t_topk_logprobs_MK.to(s_MK.dtype))
    m_MK = torch.logsumexp(torch.stack([t_MK + math.log(beta), s_MK + math.log(1 - beta)]), dim=0)
    kl_t = (t_MK.exp() * (t_MK - m_MK)).sum(-1)
    kl_s = (s_MK.exp() * (s_MK - m_MK)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


# The distribution-matching options of `train.loss` (besides pg), by name: per-token losses on the stored top-K.
TOPK_LOSSES = {"topk_reverse_kl": topk_reverse_kl, "topk_forward_kl": topk_forward_kl, "topk_jsd": topk_jsd}
DISTRIBUTION_LOSSES = tuple(TOPK_LOSSES)
