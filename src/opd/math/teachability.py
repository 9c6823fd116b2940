"""Per-token signals of TA-OPD ("Not All Disagreement Is Learnable") and of the release rule.

Every function is pure and works on one rollout batch of B sequences, T response positions and
top-K size K; tensor names carry their shape (`logprobs_BTK`). Padding positions get a finite but
meaningless value: callers mask with `valid_BT`.

Inputs, as the rollout and scoring stages write them:
- student: `s_topk_ids_BTK`, `s_topk_logprobs_BTK` (full-vocabulary log p_S of those ids, sorted
  descending), `s_logprob_BT` (log p_S of the sampled token);
- teacher: `t_on_s_logprobs_BTK` (full-vocabulary log p_T at the student's top-K ids),
  `t_topk_ids_BTK`, `t_topk_logprobs_BTK` (descending), `t_logprob_BT`;
- optional `s_on_t_logprobs_BTK`: log p_S at the teacher's top-K ids.

Where the paper and the official TA-OPD code differ, the paper is the default and the code's
behaviour is an option (DESIGN.md section 4; the whole table: `opd.math.variant`): `mode=` "exact" = paper,
"topk" = released code; `divisor=` of H; `dtype=` the arithmetic's precision (float32 as the paper's runs
and our miniature study; float64 as the official code, which also clips C to [0, 1]).
Degenerate rows give 0, not NaN, in both variants: a student top-K that is entirely absent (every entry
−inf) has H = 0 and D = 0, as in the official code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opd.math.normalise import MIN_RANGE, normalise  # noqa: F401 - Norm() is part of this module's API

PROB_FLOOR = 1e-12  # the official code floors top-K-only probabilities here before the log
SIGNAL_MODES = ("exact", "topk")
ENTROPY_DIVISORS = ("log_k", "log_n")
MARGIN_DEFINITIONS = ("top2", "prob_top2", "vs_student_top1")


def student_entropy(s_topk_logprobs_BTK: Tensor, divisor: str = "log_k", dtype: torch.dtype = torch.float32) -> Tensor:
    """H_t = -Σ_k p̄_S(k) log p̄_S(k) / log K, p̄_S = the student's top-K renormalised.

    TA-OPD's code default: only the top-K is stored per token, and dividing by log K puts H in
    [0, 1] whatever K, so sweeps over K stay comparable. `divisor="log_n"` (the official code): divide by
    log n, n = the top-K entries with a finite, positive probability (in `dtype`), and H = 0 when n < 2;
    the two differ when entries are −inf or underflow. A row with no such entry gives 0. Returns H_BT.
    """
    if divisor not in ENTROPY_DIVISORS:
        raise ValueError(f"unknown entropy divisor {divisor!r}; allowed: {', '.join(ENTROPY_DIVISORS)}")
    lp_BTK = s_topk_logprobs_BTK.to(dtype)
    K = lp_BTK.shape[-1]
    if K < 2:
        raise ValueError(f"student_entropy needs K >= 2 candidates, got K={K}")
    p_BTK = torch.softmax(lp_BTK, dim=-1)  # renormalise on the top-K
    h_BT = torch.special.entr(p_BTK).sum(-1)  # entr(0) = 0, no 0*log 0 NaN
    present_BTK = torch.isfinite(lp_BTK) & (lp_BTK.exp() > 0)
    if divisor == "log_k":
        h_BT = h_BT / math.log(K)
    else:
        n_BT = present_BTK.sum(-1)
        h_BT = torch.where(n_BT >= 2, h_BT / n_BT.clamp_min(2).to(dtype).log(), 0.0)
    return torch.where(present_BTK.any(-1), h_BT, 0.0)  # all absent: softmax is NaN there


def full_entropy(logits_BTV: Tensor) -> Tensor:
    """H_t = -Σ_v p_S(v) log p_S(v) over the whole vocabulary, in nats (not divided by log V).

    An option for when full logits are at hand (e.g. inside the trainer); the selector
    normalises with quantiles anyway, so the scale does not matter there. Returns H_BT.
    """
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    return torch.special.entr(logp_BTV.exp()).sum(-1)


def _pick_mode(mode: str | None, exact_inputs: tuple[Tensor | None, ...]) -> str:
    """Resolve mode=None to "exact" when every exact input is present, else "topk"; validate."""
    if mode is None:
        mode = "exact" if all(x is not None for x in exact_inputs) else "topk"
    if mode not in SIGNAL_MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(SIGNAL_MODES)}")
    if mode == "exact" and any(x is None for x in exact_inputs):
        raise ValueError("mode='exact' needs t_on_s_logprobs_BTK (and s_on_t_logprobs_BTK for D)")
    return mode


def _in_student_topk(t_topk_ids_BTK: Tensor, s_topk_ids_BTK: Tensor) -> Tensor:
    """in_S_BTK[b,t,j] = teacher candidate j is also one of the student's top-K ids."""
    return (t_topk_ids_BTK.unsqueeze(-1) == s_topk_ids_BTK.unsqueeze(-2)).any(-1)


def _teacher_topk_on_student_ids(
    s_topk_ids_BTK: Tensor, t_topk_ids_BTK: Tensor, t_topk_logprobs_BTK: Tensor, dtype: torch.dtype
) -> Tensor:
    """log p_T at the student's top-K ids as the code sees it: from the teacher's top-K, -inf if absent."""
    same_BTKJ = s_topk_ids_BTK.unsqueeze(-1) == t_topk_ids_BTK.unsqueeze(-2)  # [student k, teacher j]
    lp_BTKJ = t_topk_logprobs_BTK.to(dtype).unsqueeze(-2).expand(same_BTKJ.shape)
    return torch.where(same_BTKJ, lp_BTKJ, -torch.inf).amax(-1)


def _renormalised_log(logp_BTU: Tensor, in_U_BTU: Tensor, floor: float | None) -> Tensor:
    """log p̄ on U: subtract the log-mass of U; with `floor`, clamp at log(floor) (code's 1e-12)."""
    logp_BTU = logp_BTU.masked_fill(~in_U_BTU, -torch.inf)
    logp_BTU = logp_BTU - torch.logsumexp(logp_BTU, dim=-1, keepdim=True)
    return logp_BTU.clamp_min(math.log(floor)) if floor is not None else logp_BTU


def forward_kl_on_union(
    t_logp_BTU: Tensor, s_logp_BTU: Tensor, in_U_BTU: Tensor, floor: float | None = None
) -> Tensor:
    """FORWARD KL(p̄_T^U ‖ p̄_S^U) = Σ_{v∈U} p̄_T(v) [log p̄_T(v) − log p̄_S(v)], teacher first.

    Entries of the last axis with in_U False are not in U (e.g. duplicates). Terms with
    p̄_T(v) = 0 contribute 0; `floor` reproduces the code's clamp of both logs. A side with no mass on U
    at all (every entry −inf: nothing to renormalise) gives 0, as in the official code. Returns KL_BT.
    """
    has_mass_BT = _has_mass(t_logp_BTU, in_U_BTU) & _has_mass(s_logp_BTU, in_U_BTU)
    log_pt_BTU = _renormalised_log(t_logp_BTU, in_U_BTU, None)
    pt_BTU = log_pt_BTU.exp()  # the weights: an absent token weighs 0 even when its log is floored
    if floor is not None:
        log_pt_BTU = log_pt_BTU.clamp_min(math.log(floor))
    log_ps_BTU = _renormalised_log(s_logp_BTU, in_U_BTU, floor)
    term_BTU = torch.where(pt_BTU > 0, pt_BTU * (log_pt_BTU - log_ps_BTU), 0.0)
    return torch.where(has_mass_BT, term_BTU.sum(-1), 0.0)


def _has_mass(logp_BTU: Tensor, in_U_BTU: Tensor) -> Tensor:
    """has_BT: some entry of U has a finite log-probability (a positive probability)."""
    return (torch.isfinite(logp_BTU) & in_U_BTU).any(-1)


def local_disagreement(
    s_topk_ids_BTK: Tensor,
    s_topk_logprobs_BTK: Tensor,
    t_topk_ids_BTK: Tensor,
    t_topk_logprobs_BTK: Tensor,
    t_on_s_logprobs_BTK: Tensor | None = None,
    s_on_t_logprobs_BTK: Tensor | None = None,
    mode: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """D_t = KL(p̄_T^U ‖ p̄_S^U), FORWARD KL (teacher first) on U = S_K ∪ T_K, both renormalised on U.

    U is laid out as the K student ids followed by the K teacher ids, the teacher copies of ids
    already in S_K switched off, so every id of U counts once.
    - "exact" (paper; default when `s_on_t_logprobs_BTK` is given): p_T on S_K from t_on_s, on
      T_K \\ S_K from the teacher's top-K; p_S on S_K from its top-K, on T_K \\ S_K from s_on_t.
    - "topk" (official code): only each side's own top-K is known; a token outside it has
      probability 0 on that side, floored at 1e-12 before the log.
    `dtype`: the precision of the arithmetic (float64 in the official code). Returns D_BT (nats, ≥ 0).
    """
    mode = _pick_mode(mode, (t_on_s_logprobs_BTK, s_on_t_logprobs_BTK))
    t_only_BTK = ~_in_student_topk(t_topk_ids_BTK, s_topk_ids_BTK)
    in_U_BTU = torch.cat([torch.ones_like(t_only_BTK), t_only_BTK], dim=-1)
    if mode == "exact":
        t_on_s_BTK, s_on_t_BTK, floor = t_on_s_logprobs_BTK.to(dtype), s_on_t_logprobs_BTK.to(dtype), None
    else:
        t_on_s_BTK = _teacher_topk_on_student_ids(s_topk_ids_BTK, t_topk_ids_BTK, t_topk_logprobs_BTK, dtype)
        s_on_t_BTK, floor = torch.full_like(t_on_s_BTK, -torch.inf), PROB_FLOOR  # T-only ids: p_S = 0
    t_logp_BTU = torch.cat([t_on_s_BTK, t_topk_logprobs_BTK.to(dtype)], dim=-1)
    s_logp_BTU = torch.cat([s_topk_logprobs_BTK.to(dtype), s_on_t_BTK], dim=-1)
    return forward_kl_on_union(t_logp_BTU, s_logp_BTU, in_U_BTU, floor)


def compatibility(
    s_topk_ids_BTK: Tensor,
    t_on_s_logprobs_BTK: Tensor | None = None,
    t_topk_ids_BTK: Tensor | None = None,
    t_topk_logprobs_BTK: Tensor | None = None,
    mode: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """C_t: the teacher's probability mass on the student's own candidates.

    - "exact" (paper; default when t_on_s is given): C_t = Σ_{v∈S_K} p_T(v), from t_on_s.
    - "topk" (the released runs): the lower bound Σ_{v∈S_K∩T_K} p_T(v), from the teacher's top-K.
    High C means the teacher's correction stays inside what the student can already say,
    i.e. the disagreement is learnable. Returns C_BT in [0, 1]: in float64 (the official code) the sum is
    clipped to [0, 1]; in float32 (the paper default, kept for bit-identical studies) rounding can leave it
    a hair outside (0.99999994, 1.0000001), which only Norm()'s quantiles see.
    """
    mode = _pick_mode(mode, (t_on_s_logprobs_BTK,))
    if mode == "exact":
        c_BT = t_on_s_logprobs_BTK.to(dtype).exp().sum(-1)
    else:
        if t_topk_ids_BTK is None or t_topk_logprobs_BTK is None:
            raise ValueError("mode='topk' needs t_topk_ids_BTK and t_topk_logprobs_BTK")
        shared_BTK = _in_student_topk(t_topk_ids_BTK, s_topk_ids_BTK)
        c_BT = torch.where(shared_BTK, t_topk_logprobs_BTK.to(dtype).exp(), 0.0).sum(-1)
    return c_BT.clamp(0.0, 1.0) if dtype == torch.float64 else c_BT


def teachability(d_norm_BT: Tensor, c_norm_BT: Tensor) -> Tensor:
    """s_t = D̃_t · C̃_t: high only where the teacher disagrees AND keeps its mass on S_K."""
    return d_norm_BT * c_norm_BT


def teacher_margin(t_on_s_logprobs_BTK: Tensor, definition: str = "top2") -> Tensor:
    """Teacher margin m_t over the student's top-K candidates S_K (the release rule's signal).

    The paper ("Prefix Teach, Suffix Fade") does not publish its exact formula; these are ours:
    - "top2" (default): m_t = log p_T(c1) − log p_T(c2), c1, c2 = the two student candidates
      the teacher rates highest. A log-ratio, so it is the same renormalised on S_K or not.
    - "prob_top2": p_T(c1) − p_T(c2), the probability gap (bounded, less noisy when both are tiny).
    - "vs_student_top1": log p_T(c1) − log p_T(s1), s1 the student's own top-1 (index 0, since
      the student's top-K is sorted descending): how much the teacher would move the student's
      choice; 0 when they agree.
    Returns m_BT (≥ 0).
    """
    if definition not in MARGIN_DEFINITIONS:
        raise ValueError(f"unknown margin {definition!r}; allowed: {', '.join(MARGIN_DEFINITIONS)}")
    lp_BTK = t_on_s_logprobs_BTK.float()
    if definition == "vs_student_top1":
        return lp_BTK.amax(-1) - lp_BTK[..., 0]
    if lp_BTK.shape[-1] < 2:
        raise ValueError("a top-2 margin needs K >= 2")
    top2_BT2 = lp_BTK.topk(2, dim=-1).values
    if definition == "prob_top2":
        top2_BT2 = top2_BT2.exp()
    return top2_BT2[..., 0] - top2_BT2[..., 1]


def reverse_kl_sampled(s_logprob_BT: Tensor, t_logprob_BT: Tensor) -> Tensor:
    """log p_S(y_t) − log p_T(y_t): the one-sample estimate of REVERSE KL(p_S ‖ p_T) at y_t ~ p_S.

    Its negative is the OPD advantage of both papers' trainers; handy as a diagnostic.
    """
    return s_logprob_BT.float() - t_logprob_BT.float()
