"""opd.studies.stats: intervals over problems and seeds, paired comparisons, Holm; numbers worked by hand."""

import math

import numpy as np
import pytest

from opd.studies import stats


def rows(method, per_seed: dict, task="t", offset=0):
    """(method, seed, task, problem, correct) rows from {seed: [0/1, ...]} (problem ids from `offset`)."""
    return [(method, seed, task, offset + i, c) for seed, cs in per_seed.items() for i, c in enumerate(cs)]


def outcomes(n, n_correct, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros(n)
    out[rng.choice(n, n_correct, replace=False)] = 1
    return out


def test_identical_methods_one_seed_difference_exactly_zero():
    c = outcomes(100, 30)
    s = stats.group(rows("a", {0: c}) + rows("b", {0: c}))
    comp = stats.compare(s["a"], s["b"], ["t"])
    # every problem's difference is 0 and the problems are drawn together: every replicate is 0
    assert (comp.diff, comp.lo, comp.hi, comp.p, comp.paired) == (0.0, 0.0, 0.0, 1.0, True)


def test_identical_methods_three_seeds_interval_around_zero():
    seed0 = outcomes(200, 50)
    seed1, seed2 = seed0.copy(), seed0.copy()
    wrong = np.flatnonzero(seed0 == 0)
    seed1[wrong[:10]], seed2[wrong[:20]] = 1, 1  # 25%, 30%, 35%: seeds that agree on most problems, as real ones do
    per_seed = {0: seed0, 1: seed1, 2: seed2}
    s = stats.group(rows("a", per_seed) + rows("b", per_seed))
    comp = stats.compare(s["a"], s["b"], ["t"])
    assert comp.diff == 0.0 and comp.p == 1.0
    assert comp.lo < 0 < comp.hi
    # seeds are resampled separately per method. Exact enumeration of the seed part (each method's mean over
    # a multiset of 3 of {0.25, 0.30, 0.35}, 10 multisets with multinomial weights): the 2.5% / 97.5%
    # quantiles of the difference are ∓0.0667; the problems add little (the seeds differ on 20 of 200).
    assert comp.hi == pytest.approx(0.0667, abs=0.012) and comp.lo == pytest.approx(-0.0667, abs=0.012)


def test_planted_ten_point_gain_on_500_paired_problems_is_detected():
    base = outcomes(500, 150)  # 30%
    better = base.copy()
    better[np.flatnonzero(base == 0)[:50]] = 1  # 50 of the wrong problems made right: 40%, +10 points
    s = stats.group(rows("new", {0: better}) + rows("old", {0: base}))
    comp = stats.compare(s["new"], s["old"], ["t"])
    assert comp.diff == pytest.approx(0.10)
    # per-problem differences: 50 ones and 450 zeros, sd sqrt(0.1 · 0.9) = 0.3 -> SE 0.3 / sqrt(500) = 0.0134,
    # 95% interval ≈ 0.10 ± 0.026
    assert comp.lo == pytest.approx(0.10 - 0.0263, abs=0.006) and comp.hi == pytest.approx(0.10 + 0.0263, abs=0.006)
    assert comp.p < 1e-9  # z ≈ 0.10 / 0.0134 = 7.5
    assert stats.verdict(comp, comp.p) == "better" and stats.verdict(
        stats.compare(s["old"], s["new"], ["t"]), comp.p) == "worse"
    # pairing matters: unpaired, the SE would be sqrt(.4·.6/500 + .3·.7/500) = 0.030, more than twice as wide
    a_elsewhere = stats.group(rows("new", {0: better}, offset=1000) + rows("old", {0: base}))
    unpaired = stats.compare(a_elsewhere["new"], a_elsewhere["old"], ["t"])
    assert not unpaired.paired
    assert unpaired.hi - unpaired.lo == pytest.approx(2 * 1.96 * 0.030, rel=0.12)


def test_one_seed_interval_from_problem_sampling_alone():
    s = stats.group(rows("m", {0: outcomes(500, 150)}))
    e = stats.estimate(s["m"], ["t"])
    assert (e.mean, e.n_seeds, e.n_problems) == (0.30, 1, 500)
    # binomial: SE = sqrt(0.3 · 0.7 / 500) = 0.0205 -> width 2 · 1.96 · 0.0205 = 0.0803
    assert e.hi - e.lo == pytest.approx(0.0803, rel=0.1)
    # every problem wrong: no replicate varies, so Clopper-Pearson: upper = 1 − 0.025^(1/100) = 0.0362
    zero = stats.estimate(stats.group(rows("z", {0: np.zeros(100)}))["z"], ["t"])
    assert (zero.mean, zero.lo) == (0.0, 0.0) and zero.hi == pytest.approx(0.03622, abs=1e-4)
    # and every problem right, over two tasks (the replicates' sums of 1/n weights are not exactly 1 in floats)
    r = rows("o", {0: np.ones(100)}, task="a") + rows("o", {0: np.ones(100)}, task="b")
    one = stats.estimate(stats.group(r)["o"], ["a", "b"])
    assert one.hi == 1.0 and one.lo == pytest.approx(0.025 ** (1 / 200), abs=1e-9)  # 1 − (1 − 0.025^(1/n))


def test_seed_spread_widens_the_interval():
    one = stats.group(rows("m", {0: outcomes(500, 150)}))["m"]
    spread = stats.group(rows("m", {0: outcomes(500, 100), 1: outcomes(500, 200, seed=1)}))["m"]
    e1, e2 = stats.estimate(one, ["t"]), stats.estimate(spread, ["t"])
    assert e2.mean == pytest.approx(0.30)
    assert e2.hi - e2.lo > 2 * (e1.hi - e1.lo)


def test_columns_average_tasks_unweighted():
    r = rows("m", {0: [1, 1, 0, 0]}, task="a") + rows("m", {0: [1] * 10}, task="b")
    e = stats.estimate(stats.group(r)["m"], ["a", "b"])
    assert e.mean == pytest.approx((0.5 + 1.0) / 2) and e.n_problems == 14


def test_holm_on_a_hand_made_table():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> monotone: 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    # a table of three comparisons: the one at raw p ≈ 0.03 stops being distinguishable after correction
    c = stats.Comparison("a", "b", "x", 0.05, 0.01, 0.09, 0.03, True)
    assert stats.verdict(c, 0.03) == "better" and stats.verdict(c, stats.holm([0.03, 0.2, 0.5])[0]) == "n.d."


def test_compare_all_corrects_over_the_whole_table():
    base = outcomes(500, 150)
    gain = base.copy()
    gain[np.flatnonzero(base == 0)[:50]] = 1
    s = stats.group(rows("base", {0: base}) + rows("gain", {0: gain}) + rows("same", {0: base}))
    comps = stats.compare_all(s, {"t": ["t"]}, [("gain", "base"), ("same", "base")])
    assert [c.verdict for c in comps] == ["better", "n.d."]
    assert comps[0].p_holm == pytest.approx(2 * comps[0].p) and comps[1].p_holm == 1.0
    # p from the bootstrap SE, not from counting replicates: it resolves below 1 / (n_boot + 1)
    # replicates 0.1 ± 0.02: SE = 0.02 · sqrt(100 / 99) = 0.020101, z = 4.975, two-sided p = 6.53e-7
    assert stats.p_value(0.1, np.array([0.08, 0.12] * 50)) == pytest.approx(6.53e-7, rel=2e-3)
    assert stats.p_value(0.0, np.zeros(10)) == 1.0 and stats.p_value(0.1, np.full(10, 0.1)) == 0.0


def test_different_problem_sets_are_not_paired():
    s = stats.group(rows("a", {0: outcomes(100, 40)}) + rows("b", {0: outcomes(100, 30)}, offset=100),
                    runs={("a", 0): "results/train/a/seed~0", ("b", 0): "results/eval/b"})
    comp = stats.compare(s["a"], s["b"], ["t"])
    assert not comp.paired
    assert "results/train/a/seed~0" in comp.note and "results/eval/b" in comp.note and "0 shared" in comp.note
    # unpaired: SE = sqrt(.4·.6/100 + .3·.7/100) = 0.067 -> 95% half-width 0.131 around 0.10
    assert comp.diff == pytest.approx(0.10) and (comp.hi - comp.lo) / 2 == pytest.approx(0.131, rel=0.12)


def test_seeds_on_different_problems_resample_per_seed():
    s = stats.group(rows("m", {0: outcomes(100, 30)}) + [("m", 1, "t", 500 + i, c)
                                                          for i, c in enumerate(outcomes(100, 50))])
    assert "different problems" in stats.pairing_problem(s["m"], s["m"], ["t"])
    assert stats.estimate(s["m"], ["t"]).mean == pytest.approx(0.40)


def test_bad_rows_named():
    with pytest.raises(ValueError, match="problem 0 of task 't' appears twice"):
        stats.group([("m", 0, "t", 0, 1), ("m", 0, "t", 0, 0)])
    with pytest.raises(ValueError, match="no results for m seed 1"):
        stats.group([("m", 0, "t", 0, 1), ("m", 1, "u", 0, 0)])


def test_noise_and_power():
    a = outcomes(500, 150)
    b = a.copy()
    b[:100] = 1 - b[:100]  # 100 discordant problems
    s = stats.group(rows("a", {0: a, 1: a}) + rows("b", {0: b}))
    seed_sd, problem_sd = stats.noise(s, ["t"])
    d = np.r_[a[:100] - b[:100], np.zeros(400)]
    assert seed_sd == 0.0 and problem_sd == pytest.approx(np.std(d, ddof=1))
    # (1.96 + 0.84) · sqrt(2 · 0.02² / 3 + 0.4² / 500) = 2.80 · sqrt(0.0002667 + 0.00032) = 0.0678
    assert stats.detectable(0.02, 0.4, 3, 500) == pytest.approx(0.0678, abs=5e-4)
    assert math.isnan(stats.noise(stats.group(rows("a", {0: a})), ["t"])[1])


def test_seeds_paired_when_each_seed_is_one_student_build():
    # Two builds of one student: build 1 is far more distillable (b: 0 vs 0.5), but a beats b by exactly
    # 0.25 on every problem of both builds. Paired on seeds, every replicate draws the same builds for a and
    # b: each replicate is 0.25. Unpaired, a's draw and b's draw are independent: a's seed means are
    # {0.25, 0.75}, b's {0, 0.5}; the replicate a − b ranges over 0.25 ± 0.5, so the interval holds 0.
    s = stats.group(rows("a", {0: [0.25] * 20, 1: [0.75] * 20}) + rows("b", {0: [0.0] * 20, 1: [0.5] * 20}))
    paired = stats.compare(s["a"], s["b"], ["t"], seeds_paired=True)
    assert (paired.diff, paired.lo, paired.hi, paired.p) == pytest.approx((0.25, 0.25, 0.25, 0.0))
    unpaired = stats.compare(s["a"], s["b"], ["t"])
    assert unpaired.diff == pytest.approx(0.25)
    assert unpaired.lo == pytest.approx(-0.25) and unpaired.hi == pytest.approx(0.75)
    assert unpaired.p > 0.05


def test_seeds_paired_needs_the_same_seeds():
    s = stats.group(rows("a", {0: [1, 0], 1: [1, 1]}) + rows("base", {0: [0, 0]}))
    with pytest.raises(ValueError, match=r"a \(seeds \[0, 1\]\) and base \(seeds \[0\]\) cannot be paired on seeds"):
        stats.compare(s["a"], s["base"], ["t"], seeds_paired=True)


def test_noise_paired_on_seeds_takes_the_sd_of_a_difference():
    # a: seeds score 0.5 / 0.9, b: 0.3 / 0.7 (10 problems each). Unpaired, each method's seed variance is
    # (0.2² + 0.2²) / 1 = 0.08: seed sd 0.283. Paired on builds the differences are 0.2 and 0.2: seed sd 0.
    a = {0: [1] * 5 + [0] * 5, 1: [1] * 9 + [0]}
    b = {0: [1] * 3 + [0] * 7, 1: [1] * 7 + [0] * 3}
    s = stats.group(rows("a", a) + rows("b", b))
    assert stats.noise(s, ["t"])[0] == pytest.approx(math.sqrt(0.08))
    assert stats.noise(s, ["t"], seeds_paired=True)[0] == pytest.approx(0.0)
    # detectable with no seed part is the problem part alone, either way: z * problem_sd / sqrt(n)
    z = 1.959964 + 0.841621
    assert stats.detectable(0.0, 0.5, 3, 100, seeds_paired=True) == pytest.approx(z * 0.05, rel=1e-5)
    # paired, seed_sd is a difference's: var = seed_sd² / n instead of 2 seed_sd² / n
    assert stats.detectable(0.1, 0.0, 2, 100, seeds_paired=True) == pytest.approx(z * 0.1 / math.sqrt(2), rel=1e-5)
    assert stats.detectable(0.1, 0.0, 2, 100) == pytest.approx(z * 0.1, rel=1e-5)
