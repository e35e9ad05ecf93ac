"""EM comparison statistics against hand-derived values and independent references (SciPy,
brute-force enumeration, exact convolution of the sign-flip null)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from dgpo_jax.evaluation.stats import (
    DEFAULT_RESAMPLES,
    Interval,
    PairedDifference,
    bootstrap_mean_ci,
    mcnemar_exact,
    paired_difference,
    sign_flip_p_value,
    t_interval,
)

# ----------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize(
    "a_only, b_only, expected",
    [
        (1, 6, 2 * (1 + 7) / 128),  # 2 * P[X <= 1], X ~ Bin(7, 1/2)
        (6, 1, 2 * (1 + 7) / 128),  # symmetric
        (0, 0, 1.0),
        (5, 5, 1.0),  # 2 * P[X <= 5] > 1, clipped
        (0, 10, 2 / 1024),
        (2, 3, 1.0),  # 2 * (1 + 5 + 10) / 32 = 1
    ],
)
def test_mcnemar_hand_tables(a_only, b_only, expected):
    assert mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("a_only, b_only", [(3, 17), (40, 25), (12, 12), (0, 3), (100, 130)])
def test_mcnemar_matches_scipy_binomtest(a_only, b_only):
    ref = sps.binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue
    assert mcnemar_exact(a_only, b_only) == pytest.approx(ref, rel=1e-9)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


# ----------------------------------------------------------------------------- t interval


def test_t_interval_hand_values():
    mean, low, high = t_interval([0.5, 0.6, 0.7])
    # t_{0.975, 2}: with 2 degrees of freedom t_p = (2p - 1) / sqrt(2p(1 - p)) in closed form,
    # 0.95 / sqrt(0.04875) = 4.3026527297494...; sd = 0.1
    t975 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert t975 == pytest.approx(4.302652729911275, rel=1e-10)  # the table value
    half = t975 * 0.1 / math.sqrt(3)
    assert mean == pytest.approx(0.6)
    assert low == pytest.approx(0.6 - half, rel=1e-12)
    assert high == pytest.approx(0.6 + half, rel=1e-12)


def test_t_interval_other_level():
    # t_{0.95, 3} = 2.3533634348018264; values 1..4: mean 2.5, sd = sqrt(5/3)
    mean, low, high = t_interval([1.0, 2.0, 3.0, 4.0], level=0.9)
    half = 2.3533634348018264 * math.sqrt(5 / 3) / 2
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half), rel=1e-12)


def test_t_interval_single_value_and_errors():
    mean, low, high = t_interval([0.42])
    assert mean == 0.42 and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError):
        t_interval([])
    with pytest.raises(ValueError):
        t_interval([0.1, float("nan")])
    with pytest.raises(ValueError):
        t_interval([0.1, 0.2], level=1.0)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_constant_and_single_item():
    assert bootstrap_mean_ci([0.1] * 7) == (0.1, 0.1, 0.1)
    assert bootstrap_mean_ci([1, 1, 1], groups=[0, 1, 1]) == (1.0, 1.0, 1.0)
    assert bootstrap_mean_ci([0.37]) == (0.37, 0.37, 0.37)


def test_bootstrap_validation():
    with pytest.raises(ValueError):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError):
        bootstrap_mean_ci([0.0, float("nan")])
    with pytest.raises(ValueError):
        bootstrap_mean_ci([0.0, 1.0], level=0.0)
    with pytest.raises(ValueError):
        bootstrap_mean_ci([0.0, 1.0], resamples=0)
    with pytest.raises(ValueError, match="groups shape"):
        bootstrap_mean_ci([0.0, 1.0, 1.0], groups=[0, 1])


def test_bootstrap_matches_scipy_percentile():
    values = np.random.default_rng(123).binomial(1, 0.45, size=200).astype(float)
    ref = sps.bootstrap(
        (values,), np.mean, method="percentile", n_resamples=10_000, random_state=7
    ).confidence_interval
    mean, low, high = bootstrap_mean_ci(values)
    assert mean == pytest.approx(values.mean())
    assert abs(low - ref.low) < 0.01
    assert abs(high - ref.high) < 0.01


def test_bootstrap_half_width_near_normal_approximation():
    values = np.array([1.0] * 240 + [0.0] * 160)  # n = 400, p = 0.6
    mean, low, high = bootstrap_mean_ci(values)
    normal_half = 1.96 * math.sqrt(0.6 * 0.4 / 400)
    assert mean == pytest.approx(0.6)
    assert (high - low) / 2 == pytest.approx(normal_half, rel=0.10)
    assert low < 0.6 < high


def test_bootstrap_seed_reproducible():
    values = np.random.default_rng(5).binomial(1, 0.3, size=150)
    first = bootstrap_mean_ci(values, seed=11)
    assert bootstrap_mean_ci(values, seed=11) == first
    other = bootstrap_mean_ci(values, seed=12)
    assert other != first
    assert other.mean == first.mean
    assert abs(other.low - first.low) < 0.02 and abs(other.high - first.high) < 0.02


def test_bootstrap_small_chunks_give_valid_interval(monkeypatch):
    # Force many small index blocks: the interval must still agree with the one-block result.
    import dgpo_jax.evaluation.stats as stats_module  # noqa: PLC0415 - module patched here

    values = np.random.default_rng(9).binomial(1, 0.5, size=300)
    whole = bootstrap_mean_ci(values)
    monkeypatch.setattr(stats_module, "_CHUNK_ELEMENTS", 1000)
    chunked = bootstrap_mean_ci(values)
    assert abs(chunked.low - whole.low) < 0.015 and abs(chunked.high - whole.high) < 0.015


def test_bootstrap_stratified_mean_of_group_means():
    # group 0: [1, 1, 1, 0] -> 0.75; group 1: [0, 1] -> 0.5; mean of group means 0.625
    # (the pooled mean would be 4/6).
    values = [1, 1, 0, 1, 1, 0]
    groups = [0, 0, 1, 0, 1, 0]
    mean, low, high = bootstrap_mean_ci(values, groups=groups)
    assert mean == pytest.approx(0.625)
    # Independent reference: the resampled group sums are Bin(4, 3/4) and Bin(2, 1/2), so the
    # statistic is (k/4 + j/2) / 2 with an exactly computable law. Its 2.5% and 97.5% quantiles
    # are 0.25 and 1.0 (CDF 0.0127 at 0.125, 0.0674 at 0.25, 0.921 at 0.875), far enough from
    # 0.025 / 0.975 that 10k resamples land on them.
    law: dict[float, float] = {}
    for k, j in itertools.product(range(5), range(3)):
        x = (k / 4 + j / 2) / 2
        law[x] = law.get(x, 0.0) + sps.binom.pmf(k, 4, 0.75) * sps.binom.pmf(j, 2, 0.5)
    support = sorted(law)
    cdf = np.cumsum([law[x] for x in support])
    exact_low = support[int(np.searchsorted(cdf, 0.025))]
    exact_high = support[int(np.searchsorted(cdf, 0.975))]
    assert (exact_low, exact_high) == (0.25, 1.0)
    assert (low, high) == (exact_low, exact_high)


def test_bootstrap_constant_group_adds_no_width():
    varied = np.random.default_rng(3).binomial(1, 0.5, size=120).astype(float)
    alone = bootstrap_mean_ci(varied)
    values = np.concatenate([np.ones(50), varied])
    groups = np.concatenate([np.zeros(50, int), np.ones(120, int)])
    with_ones = bootstrap_mean_ci(values, groups=groups)
    # statistic = (1 + mean of the varied group) / 2: half the width of the varied group alone
    assert with_ones.mean == pytest.approx((1 + varied.mean()) / 2)
    assert (with_ones.high - with_ones.low) == pytest.approx((alone.high - alone.low) / 2, rel=0.1)
    # replacing the constant 1s by 0s shifts the statistic by exactly 1/2 in every resample
    values[:50] = 0.0
    with_zeros = bootstrap_mean_ci(values, groups=groups)
    assert with_ones.low - with_zeros.low == pytest.approx(0.5, abs=1e-12)
    assert with_ones.high - with_zeros.high == pytest.approx(0.5, abs=1e-12)


def test_results_are_plain_floats():
    ci = bootstrap_mean_ci([0, 1, 1, 0, 1])
    assert all(type(x) is float for x in ci)
    json.dumps(ci)
    assert isinstance(ci, Interval)


# ----------------------------------------------------------------------------- sign flip


def _brute_force_sign_flip(diffs) -> float:
    """Two-sided exact p-value by looping over every sign vector (independent reference)."""
    observed = abs(sum(diffs))
    hits = total = 0
    for signs in itertools.product((1, -1), repeat=len(diffs)):
        total += 1
        hits += abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-9
    return hits / total


def _convolution_sign_flip(int_diffs) -> float:
    """Exact two-sided p-value for integer differences from the null distribution of the sum,
    built by convolving the two-point laws {-d, +d} (each with probability 1/2)."""
    offset = sum(abs(d) for d in int_diffs)
    pmf = np.zeros(2 * offset + 1)
    pmf[offset] = 1.0
    for d in int_diffs:
        d = abs(d)
        new = np.zeros_like(pmf)
        new[: len(pmf) - d] += 0.5 * pmf[d:]
        new[d:] += 0.5 * pmf[: len(pmf) - d]
        pmf = new
    observed = abs(sum(int_diffs))
    support = np.arange(-offset, offset + 1)
    return float(pmf[np.abs(support) >= observed].sum())


def test_sign_flip_hand_cases():
    assert sign_flip_p_value([1, 1, 1]) == pytest.approx(2 / 8)  # only +++ and --- as extreme
    assert sign_flip_p_value([1, -1]) == 1.0
    assert sign_flip_p_value([0, 0, 0]) == 1.0
    assert sign_flip_p_value([]) == 1.0
    # zeros are ignored: same as [2, 1]; |2+1|=3 is reached by ++ and -- -> 2/4
    assert sign_flip_p_value([0, 2, 0, 1]) == pytest.approx(0.5)


def test_sign_flip_exact_matches_brute_force_16():
    diffs = [0.3, -0.1, 0.5, 0.2, 0.7, 0.1, -0.4, 0.6, 0.2, 0.9, 0.3, -0.2, 0.4, 0.1, 0.5, 0.8]
    assert sign_flip_p_value(diffs) == pytest.approx(_brute_force_sign_flip(diffs), abs=1e-12)


def test_sign_flip_monte_carlo_close_to_exact():
    # 24 non-zero differences: Monte Carlo path; exact reference by convolution.
    diffs = [3, -1, 2, 1, -2, 4, 1, 1, -3, 2, 2, -1, 1, 3, -1, 2, 1, -2, 1, 1, 2, -1, 3, 1]
    exact = _convolution_sign_flip(diffs)
    assert 0.01 < exact < 0.2  # a p-value where Monte Carlo error matters
    assert sign_flip_p_value(diffs) == pytest.approx(exact, abs=0.01)


def test_sign_flip_convolution_reference_agrees_with_brute_force():
    diffs = [2, -1, 3, 1, 1, -2, 1, 2, 1, -1, 2, 1]
    assert _convolution_sign_flip(diffs) == pytest.approx(_brute_force_sign_flip(diffs))


def test_sign_flip_monte_carlo_correction():
    # 40 equal positive differences: no random flip reaches the observed sum (chance 2^-39
    # per draw), so p = (0 + 1) / (999 + 1).
    assert sign_flip_p_value([1.0] * 40, resamples=999) == pytest.approx(1 / 1000)


# ----------------------------------------------------------------------------- paired difference


def test_paired_binary_uses_mcnemar_with_discordant_counts():
    a = [1, 1, 1, 0, 1, 0, 1, 1]
    b = [1, 0, 0, 1, 0, 0, 0, 1]
    # a-only: items 1, 2, 4, 6 -> 4; b-only: item 3 -> 1; p = 2 * (1 + 5) / 32
    res = paired_difference(a, b)
    assert isinstance(res, PairedDifference)
    assert res.test == "mcnemar_exact"
    assert res.discordant == (4, 1)
    assert res.p_value == pytest.approx(12 / 32)
    assert res.diff == pytest.approx(3 / 8)
    assert res.n == 8
    assert res.low <= res.diff <= res.high


def test_paired_diff_is_mean_difference():
    rng = np.random.default_rng(0)
    a, b = rng.binomial(1, 0.5, 300), rng.binomial(1, 0.4, 300)
    res = paired_difference(a, b, resamples=2000)
    assert res.diff == pytest.approx(np.mean(a - b))


def test_paired_identical_methods():
    scores = np.random.default_rng(1).binomial(1, 0.5, 50)
    res = paired_difference(scores, scores.copy())
    assert (res.diff, res.low, res.high, res.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert res.discordant == (0, 0)
    cont = np.random.default_rng(2).random(30)
    res = paired_difference(cont, cont.copy())
    assert (res.diff, res.low, res.high, res.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert res.test == "sign_flip_permutation"


def test_paired_clearly_better_method():
    a = np.zeros(200)
    a[:150] = 1
    b = np.zeros(200)
    b[:100] = 1  # b's right answers are a subset of a's
    res = paired_difference(a, b)
    assert res.diff == pytest.approx(0.25)
    assert res.low > 0
    assert res.discordant == (50, 0)
    assert res.p_value < 1e-6
    assert res.p_value == pytest.approx(2 * 0.5**50)


def test_paired_non_binary_uses_sign_flip():
    a = [0.5, 0.8, 0.9, 0.7]
    b = [0.4, 0.6, 0.95, 0.5]
    res = paired_difference(a, b)
    assert res.test == "sign_flip_permutation"
    assert res.discordant is None
    # diffs 0.1, 0.2, -0.05, 0.2: only +/-(+,+,-,+) and +/-(+,+,+,+) reach |0.45| -> 4/16
    assert res.p_value == pytest.approx(_brute_force_sign_flip([0.1, 0.2, -0.05, 0.2]))
    assert res.p_value == pytest.approx(4 / 16)
    assert res.diff == pytest.approx(0.1125)


def test_paired_grouped_by_seed():
    # two seeds of 4 questions; per-seed mean differences 0.5 and 0.0 -> 0.25
    a = np.array([[1, 1, 1, 0], [1, 0, 1, 0]])
    b = np.array([[1, 0, 0, 0], [1, 0, 1, 0]])
    groups = np.repeat([[0], [1]], 4, axis=1)
    res = paired_difference(a, b, groups=groups)
    assert res.diff == pytest.approx(0.25)
    assert res.discordant == (2, 0)
    assert res.p_value == pytest.approx(2 / 4)
    assert res.n == 8
    # seed 1 is identical for both methods: only seed 0 varies, its diff mean ranges over k/4
    assert 0.0 <= res.low <= res.high <= 0.5


def test_paired_validation():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        paired_difference([1, 0, 1], [1, 0, 1, 1])
    with pytest.raises(ValueError):
        paired_difference([1.0, float("nan")], [1.0, 0.0])


def test_default_resamples():
    assert DEFAULT_RESAMPLES == 10_000
