"""Every paper/official difference of TA-OPD (opd.math.variant), each in both variants, with hand-worked numbers."""

import argparse
import re
import math

import pytest
import torch

from opd.engines.signals import add_signal_args, batch_signals, resolve_signal_args, selection_kwargs
from opd.math import variant
from opd.math.budget import budget_size
from opd.math.normalise import normalise
from opd.math.select import ScoreOptions, Signals, select_mask
from opd.math.teachability import compatibility, local_disagreement, student_entropy
from opd.math.variant import OFFICIAL, PAPER
from opd.studies.fixed_context import gains

INF = math.inf


def _flat(*rows) -> torch.Tensor:
    """log of probability rows, shaped [N, K] in float64 (0 -> -inf)."""
    return torch.tensor(rows, dtype=torch.float64).log()


def _batch(s_lp, t_on_s, t_lp, s_on_t, s_ids, t_ids, lengths):
    """Stored-format rollout and score tensors of hand-made rows (N = sum(lengths) tokens)."""
    n = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    rollout = {"offsets_B1": offsets, "tokens_N": torch.zeros(n, dtype=torch.long),
               "s_topk_ids_NK": torch.tensor(s_ids), "s_topk_logprobs_NK": s_lp, "s_logprob_N": torch.zeros(n)}
    score = {"t_topk_ids_NK": torch.tensor(t_ids), "t_topk_logprobs_NK": t_lp, "t_on_s_logprobs_NK": t_on_s,
             "s_on_t_logprobs_NK": s_on_t, "t_logprob_N": torch.zeros(n)}
    return rollout, score


# One position, K = 2: S_K = [5, 7], T_K = [7, 9], U = {5, 7, 9}.
#   p_S(5)=.5  p_S(7)=.3  p_S(9)=.1      p_T(5)=.2  p_T(7)=.4  p_T(9)=.3
# A second position has an entirely absent student top-K (every entry -inf).
SHARED = _batch(s_lp=_flat([0.5, 0.3], [0, 0]), t_on_s=_flat([0.2, 0.4], [0.5, 0.5]), t_lp=_flat([0.4, 0.3], [0.5, 0.5]),
                s_on_t=_flat([0.3, 0.1], [0, 0]), s_ids=[[5, 7], [1, 2]], t_ids=[[7, 9], [1, 2]], lengths=[1, 1])


def test_c_d_h_of_one_position_in_both_variants():
    paper, official = (batch_signals(*SHARED, opts) for opts in (PAPER, OFFICIAL))
    # C: paper exact p_T(5) + p_T(7) = .6; official lower bound, only 7 is in S_K ∩ T_K: .4.
    assert paper.compatibility_BT[0, 0].item() == pytest.approx(0.6, abs=1e-6)
    assert official.compatibility_BT[0, 0].item() == pytest.approx(0.4, abs=1e-15)
    # D exact: p̄_T = (2, 4, 3)/9, p̄_S = (5, 3, 1)/9 on (5, 7, 9):
    #   2/9 ln(2/5) + 4/9 ln(4/3) + 3/9 ln 3 = -.203620 + .127859 + .366204 = .290443
    assert paper.disagreement_BT[0, 0].item() == pytest.approx(0.290443, abs=1e-5)
    # D official: teacher knows 7, 9 only -> (0, 4/7, 3/7); student knows 5, 7 -> (.625, .375, 0 -> 1e-12):
    #   4/7 ln((4/7)/.375) + 3/7 ln((3/7)/1e-12) = .240693 + 11.478739 = 11.719432
    assert official.disagreement_BT[0, 0].item() == pytest.approx(11.719432, abs=1e-6)
    # H: K = n = 2, p̄_S = (.625, .375): 0.661563 nats / ln 2 = 0.954434 in both.
    for sig in (paper, official):
        assert sig.entropy_BT[0, 0].item() == pytest.approx(0.954434, abs=1e-6)
    assert paper.entropy_BT.dtype == torch.float32 and official.entropy_BT.dtype == torch.float64


def test_an_absent_student_top_k_gives_finite_signals_and_a_mask():
    for opts in (PAPER, OFFICIAL):
        sig = batch_signals(*SHARED, opts)
        assert torch.isfinite(sig.entropy_BT).all() and torch.isfinite(sig.disagreement_BT).all()
        assert sig.entropy_BT[1, 0].item() == 0.0 and sig.disagreement_BT[1, 0].item() == 0.0
        for name in ("ta_opd", "ta_opd_ent", "entropy", "dincompat_high"):
            mask = select_mask(name, sig.for_selection(), 0.5, **selection_kwargs(opts))
            assert mask.sum() >= 1  # did not raise on NaN
    # The same row through the pure functions, top-K D and exact D alike.
    absent = torch.full((1, 1, 2), -INF)
    assert student_entropy(absent).item() == 0.0 and student_entropy(absent, "log_n").item() == 0.0
    ids, t_lp = torch.tensor([[[1, 2]]]), torch.tensor([[[-0.5, -1.0]]])
    assert local_disagreement(ids, absent, ids + 5, t_lp, mode="topk").item() == 0.0
    assert local_disagreement(ids, absent, ids + 5, t_lp, t_lp, absent, mode="exact").item() == 0.0


def test_entropy_divisor_log_k_vs_log_n():
    # K = 4, p = (.5, .5, 0, 0): ln 2 nats. log K: ln 2 / ln 4 = .5; log n (n = 2 finite, positive): 1.
    lp = _flat([0.5, 0.5, 0, 0]).view(1, 1, 4)
    assert student_entropy(lp).item() == pytest.approx(0.5, abs=1e-7)
    assert student_entropy(lp, "log_n", torch.float64).item() == pytest.approx(1.0, abs=1e-15)
    # Underflow: exp(-800) = 0 in float64, so n = 2 again; log K (K = 3) gives ln 2 / ln 3 = .630930.
    under = torch.tensor([[[math.log(0.5), math.log(0.5), -800.0]]], dtype=torch.float64)
    assert student_entropy(under, "log_n", torch.float64).item() == pytest.approx(1.0, abs=1e-15)
    assert student_entropy(under).item() == pytest.approx(0.630930, abs=1e-6)
    # n = 1 (one finite entry): H = 0 with log n, not 0/0.
    assert student_entropy(_flat([1.0, 0, 0]).view(1, 1, 3), "log_n").item() == 0.0


def test_compatibility_float64_is_clipped_float32_is_not():
    # p_T = (.34, .247, .293, .12), the last chosen so the row sums to 1 - 1e-16 (in exact arithmetic);
    # float64 sums the exps to 1.0000000000000002, which official clips to exactly 1.0.
    row = [0.34, 0.247, 0.293, 1 - 1e-16 - (0.34 + 0.247 + 0.293)]
    lp = torch.tensor(row, dtype=torch.float64).log().view(1, 1, 4)
    ids = torch.arange(4).view(1, 1, 4)
    assert lp.exp().sum().item() == 1.0000000000000002
    assert compatibility(ids, lp, mode="exact", dtype=torch.float64).item() == 1.0
    # float32 (paper default) leaves rounding as it is: (.3, .3, .4) sums to 0.99999994.
    lp3 = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64).log().view(1, 1, 3)
    assert compatibility(ids[..., :3], lp3, mode="exact").item() == pytest.approx(1 - 2**-24, abs=0)


def test_budget_rounding_n100_rho007():
    # 0.07 * 100 = 7.000000000000001 in float64: paper rounds the hair away (7), official keeps it (8).
    assert 0.07 * 100 == 7.000000000000001
    assert budget_size(0.07, 100) == 7 and budget_size(0.07, 100, "official") == 8
    assert budget_size(0.1, 30) == budget_size(0.1, 30, "official") == 3  # 0.1 * 30 is exactly 3.0
    d = torch.arange(100, dtype=torch.float).view(1, 100)
    sig = Signals(torch.ones(1, 100, dtype=torch.bool), torch.zeros(1, 100), d, torch.ones(1, 100))
    for opts, kept in ((PAPER, 7), (OFFICIAL, 8)):
        assert int(select_mask("kl", sig, 0.07, **selection_kwargs(opts)).sum()) == kept


def test_official_budget_tops_up_by_the_ta_opd_ent_score():
    # D = .9 .1 .5 .3 | .2 .15; N = 6, ρ = .5 -> n = 3. Global top 3 = (0,0), (0,2), (0,3).
    # Paper: reserve each sequence's best by the selector's own score, (1,0) = .2, then fill: 3 in all.
    # Official: global top 3, then sequence 1 topped up by ta_opd_ent; C constant -> C~ = 0 -> s = 0, so
    # ta_opd_ent = H~, which peaks at (1,1): 4 in all.
    valid = torch.ones(2, 4, dtype=torch.bool)
    valid[1, 2:] = False
    sig = Signals(valid, torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.9, 0.0, 0.0]]),
                  torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.15, 5.0, 5.0]]), torch.ones(2, 4))
    paper = select_mask("kl", sig, 0.5, **selection_kwargs(PAPER))
    official = select_mask("kl", sig, 0.5, **selection_kwargs(OFFICIAL))
    assert paper.nonzero().tolist() == [[0, 0], [0, 2], [1, 0]]
    assert official.nonzero().tolist() == [[0, 0], [0, 2], [0, 3], [1, 1]]


def test_norm_positions_eps_and_quantile_modes():
    # z = 0..4 on five response positions; only the first three are selectable (say, pre-release).
    z = torch.arange(5, dtype=torch.float64).view(1, 5)
    response = torch.ones(1, 5, dtype=torch.bool)
    valid = torch.tensor([[True, True, True, False, False]])
    # Paper: quantiles over {0, 1, 2}: Q.05 = .1, Q.95 = 1.9 -> Norm(1) = .9 / (1.8 + 1e-6).
    paper = normalise(z, valid)
    assert paper[0, 1].item() == pytest.approx(0.9 / (1.8 + 1e-6), abs=1e-12)
    # Official: over all five, ε = 0: Q.05 = .2, Q.95 = 3.8 -> Norm(1) = .8 / 3.6 = .222222.
    official = normalise(z, valid, eps=0.0, count_mask_BT=response)
    assert official[0, 1].item() == pytest.approx(0.8 / 3.6, abs=1e-12)
    assert official[0, 3:].tolist() == [0.0, 0.0]  # not selectable: 0 in both
    # Asymmetric pair (.1, 1.0) over all five: Q.1 = .4, Q1 = 4 -> Norm(1) = .6 / 3.6 = 1/6.
    asym = normalise(z, response, (0.1, 1.0), eps=0.0)
    assert asym[0, 1].item() == pytest.approx(1 / 6, abs=1e-12)
    # "No normalisation" as the official code has it: z / max(max z, 1e-12) over the Norm positions, in [0, 1].
    # Over the valid {0, 1, 2}: max 2 -> 0, .5, 1; over the whole response: max 4 -> 0, .25, .5 (3, 4 not valid).
    assert normalise(z, valid, mode="none").tolist() == [[0.0, 0.5, 1.0, 0.0, 0.0]]
    assert normalise(z, valid, mode="none", count_mask_BT=response).tolist() == [[0.0, 0.25, 0.5, 0.0, 0.0]]
    # Negative values clip to 0; a batch maximum below 1e-12 divides by 1e-12 instead.
    neg = torch.tensor([[-2.0, 1.0, 3.0, 6.0]], dtype=torch.float64)
    assert normalise(neg, torch.ones(1, 4, dtype=torch.bool), mode="none").tolist() == [[0.0, 1 / 6, 0.5, 1.0]]
    flat = torch.tensor([[-1.0, 0.0, 1e-13]], dtype=torch.float64)
    assert normalise(flat, torch.ones(1, 3, dtype=torch.bool), mode="none").tolist() == [[0.0, 0.0, 0.1]]
    # A range of 1e-13 (< 1e-12): official maps everything to 0; paper's ε keeps a tiny slope.
    tiny = torch.tensor([[1.0, 1.0 + 1e-13]], dtype=torch.float64)
    both = torch.ones(1, 2, dtype=torch.bool)
    assert normalise(tiny, both, eps=0.0).tolist() == [[0.0, 0.0]]
    assert 0 < normalise(tiny, both)[0, 1].item() < 1e-6


def test_norm_positions_follow_the_variant_in_batch_signals():
    # Two positions: narrowing valid_BT (as release+ta_opd does) keeps the response mask for Norm under
    # official only.
    sig = batch_signals(*SHARED, OFFICIAL)
    assert torch.equal(sig.for_selection().norm_mask_BT, sig.valid_BT)
    assert batch_signals(*SHARED, PAPER).for_selection().norm_mask_BT is None


def test_dincompat_high_selector():
    # Min-max Norm: D~ = (0, .5, 1, .75, .25), C~ = (1, .5, 0, .75, .25)
    # D~(1 - C~) = (0, .25, 1, .1875, .1875): top 2 = t2, t1.
    sig = Signals(torch.ones(1, 5, dtype=torch.bool), None, torch.tensor([[0.0, 2, 4, 3, 1]]),
                  torch.tensor([[0.9, 0.5, 0.1, 0.7, 0.3]]))
    mask = select_mask("dincompat_high", sig, 0.4, options=ScoreOptions(quantiles=(0.0, 1.0), eps=0.0))
    assert mask.nonzero()[:, 1].tolist() == [1, 2]


def test_random_streams():
    # Valid positions in row-major order: (0,0) (0,1) (0,2) (1,0) (1,1); N = 5, ρ = .4 -> n = 2.
    # random.Random(42 + 3).shuffle -> [(0,0), (1,1), (0,1), (1,0), (0,2)]: keep (0,0), (1,1).
    # random.Random(42 + 0).shuffle -> [(1,0), (0,1), (0,2), (1,1), (0,0)]: keep (1,0), (0,1).
    valid = torch.tensor([[True, True, True], [True, True, False]])
    sig = Signals(valid)
    kw = dict(budget="official", min_keep=0, random_stream="official")
    assert select_mask("random", sig, 0.4, rollout_counter=3, **kw).nonzero().tolist() == [[0, 0], [1, 1]]
    assert select_mask("random", sig, 0.4, rollout_counter=0, **kw).nonzero().tolist() == [[0, 1], [1, 0]]
    # The torch stream ignores the counter and follows the seed.
    a = select_mask("random", sig, 0.4, seed=1, rollout_counter=3)
    assert torch.equal(a, select_mask("random", sig, 0.4, seed=1, rollout_counter=0))


def test_fixed_context_gain_absolute_vs_relative():
    # base KL (2, 4) -> mean 3; after (1, 2) -> mean 1.5: absolute 1.5, relative .5.
    base, new, mask = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0]), torch.tensor([True, False])
    assert gains(base, new, mask, "absolute")["gain"] == 1.5
    assert gains(base, new, mask, "relative")["gain"] == 0.5
    assert gains(base, new, mask)["gain_abs_selected"] == 1.0


def _args(*argv, aggregation=True):
    p = argparse.ArgumentParser()
    add_signal_args(p, "--signal-aggregation" if aggregation else "--aggregation")
    return p.parse_args(list(argv))


def test_variant_sets_everything_and_overrides_are_recorded():
    args = _args("--signal-variant", "official", "--signal-budget", "paper", "--signal-quantiles", "0.1", "1.0")
    opts = resolve_signal_args(args)
    assert opts == variant.SignalOptions(**{**OFFICIAL.as_dict(), "budget": "paper", "quantiles": (0.1, 1.0)})
    assert args.signal_overrides == "budget,quantiles" and args.signal_aggregation == "sequence_mean"
    # A value equal to the variant's is no override; training's own --aggregation resolves from the variant.
    train_like = _args("--signal-variant", "official", "--signal-gain", "relative", aggregation=False)
    resolve_signal_args(train_like)
    assert train_like.aggregation == "sequence_mean" and train_like.signal_overrides == ""
    paper = _args()
    assert resolve_signal_args(paper) == PAPER and paper.signal_precision == "float32"


def test_unknown_values_name_the_key_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"--signal-variant: unknown value 'bogus'; allowed: paper, official"):
        resolve_signal_args(_args("--signal-variant", "bogus"))
    with pytest.raises(ValueError, match=r"--signal-random-stream: unknown value 'x'; allowed: torch, official"):
        resolve_signal_args(_args("--signal-random-stream", "x"))
    with pytest.raises(ValueError, match=r"--aggregation: unknown value 'mean'; allowed: token_mean, sequence_mean"):
        resolve_signal_args(_args("--aggregation", "mean", aggregation=False))
    with pytest.raises(ValueError, match=r"--signal-quantiles: need 0 <= lo < hi <= 1"):
        resolve_signal_args(_args("--signal-quantiles", "0.9", "0.1"))


def test_config_refuses_unknown_signals_values(repo):
    import yaml

    from opd.infra.config import ConfigError, validate_config

    for key, value, expected in (("variant", "bogus", "signals.variant: 'bogus' is not allowed; allowed values: "
                                  "'paper', 'official'"),
                                 ("budget", "code", "signals.budget: 'code' is not allowed"),
                                 ("quantiles", [0.5], "signals.quantiles: [0.5] is too short")):
        cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
        cfg["signals"][key] = value
        with pytest.raises(ConfigError, match=re.escape(expected)):
            validate_config(cfg)
