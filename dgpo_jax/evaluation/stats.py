"""Uncertainty and significance for exact-match (EM) comparisons on shared held-out questions.

Everything here is plain NumPy / SciPy and returns Python floats (JSON-serialisable).

* :func:`bootstrap_mean_ci`: percentile bootstrap of a mean over items (questions), optionally
  stratified by a group label (e.g. the training seed): items are resampled with replacement
  *within* each group, group sizes are kept, and the statistic is the mean of the group means.
* :func:`t_interval`: Student t interval for the mean of a few numbers (e.g. per-seed EM).
* :func:`mcnemar_exact`: exact two-sided McNemar test (binomial test on the discordant pairs).
* :func:`sign_flip_p_value`: two-sided paired permutation (random sign-flip) test.
* :func:`paired_difference`: the difference of two methods scored on the same items, with a
  stratified paired bootstrap CI and the McNemar (0/1 data) or sign-flip (otherwise) p-value.

Inputs may have any shape; they are flattened (C order), and ``groups`` must have the same shape
as the values it labels. NaN or infinite values raise ``ValueError``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats as _sps

DEFAULT_RESAMPLES = 10_000

# Elements per drawn index block: int64 indices plus the gathered float64 values take
# 16 bytes each, so one block stays near 64 MB however large resamples * n is.
_CHUNK_ELEMENTS = 1 << 22
# Largest number of non-zero differences for which the sign-flip test enumerates all 2^m flips.
_EXACT_MAX = 16


class Interval(NamedTuple):
    """A point estimate with the bounds of a confidence interval."""

    mean: float
    low: float
    high: float


class PairedDifference(NamedTuple):
    """Difference ``a - b`` of two methods on the same items, with CI and two-sided p-value."""

    diff: float  # mean of a - b (mean of per-group mean differences when grouped)
    low: float  # CI of diff
    high: float
    p_value: float  # two-sided
    test: str  # "mcnemar_exact" or "sign_flip_permutation"
    n: int  # number of pairs
    discordant: tuple[int, int] | None  # (a right & b wrong, a wrong & b right) for 0/1 data


def _as_finite(values, name: str = "values") -> np.ndarray:
    """``values`` as a float64 array; ValueError when it holds NaN or infinities."""
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite entries")
    return arr


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _check_resamples(resamples: int) -> None:
    if int(resamples) != resamples or resamples < 1:
        raise ValueError(f"resamples must be an integer >= 1, got {resamples}")


def _group_slices(values: np.ndarray, groups) -> list[np.ndarray]:
    """The flattened values split by group label (sorted label order); one group when None."""
    flat = values.ravel()
    if groups is None:
        return [flat]
    labels = np.asarray(groups)
    if labels.shape != values.shape:
        raise ValueError(f"groups shape {labels.shape} differs from values shape {values.shape}")
    _, inverse = np.unique(labels.ravel(), return_inverse=True)
    return [flat[inverse == g] for g in range(inverse.max() + 1)]


def _resampled_means(v: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of ``v`` (size len(v), with replacement).

    Index matrices are drawn in row blocks of about ``_CHUNK_ELEMENTS`` entries. A constant ``v``
    gives its value exactly and draws nothing from ``rng``.
    """
    n = v.size
    if np.all(v == v[0]):
        return np.full(resamples, v[0])
    rows = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = v[idx].mean(axis=1)
    return out


def _point_mean(v: np.ndarray) -> float:
    """Mean of ``v``; exactly ``v[0]`` when ``v`` is constant (matches the resampled means)."""
    return float(v[0]) if np.all(v == v[0]) else float(v.mean())


def bootstrap_mean_ci(
    values,
    *,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    groups=None,
) -> Interval:
    """Percentile bootstrap confidence interval for the mean over items.

    Without ``groups``: resample the n items with replacement ``resamples`` times; the statistic
    is the resample mean. With ``groups`` (one label per item, e.g. the seed): resample items
    with replacement *within* each group, keeping each group's size (stratified bootstrap); the
    statistic is the unweighted mean of the group means, so every group counts equally, and the
    point estimate ``mean`` is that same mean of group means. The bounds are the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (linear interpolation) of the
    ``resamples`` statistics. Randomness: ``np.random.default_rng(seed)``, groups drawn in
    sorted label order.

    Empty input raises ValueError; constant input gives ``(c, c, c)``; one item gives
    ``(v, v, v)``; a constant group adds no width.
    """
    _check_level(level)
    _check_resamples(resamples)
    arr = _as_finite(values)
    if arr.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    parts = _group_slices(arr, groups)
    flat = arr.ravel()
    if np.all(flat == flat[0]):
        c = float(flat[0])
        return Interval(c, c, c)
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    point = 0.0
    for v in parts:
        total += _resampled_means(v, resamples, rng)
        point += _point_mean(v)
    stats = total / len(parts)
    low, high = np.quantile(stats, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(point / len(parts), float(low), float(high))


def t_interval(values, *, level: float = 0.95) -> Interval:
    """Two-sided Student t interval for the mean of a few numbers (e.g. per-seed EM).

    ``mean +- t_{(1 + level) / 2, n - 1} * sd / sqrt(n)`` with the sample standard deviation
    (ddof=1). One value gives ``(v, nan, nan)``; empty input raises ValueError.
    """
    _check_level(level)
    v = _as_finite(values).ravel()
    if v.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(v.mean())
    if v.size == 1:
        return Interval(mean, float("nan"), float("nan"))
    half = _sps.t.ppf((1.0 + level) / 2.0, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return Interval(mean, float(mean - half), float(mean + half))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts.

    Under the null, each of the ``n = a_only + b_only`` discordant pairs favours either method
    with probability 1/2, so ``p = min(1, 2 * P[X <= min(a_only, b_only)])`` with
    ``X ~ Binomial(n, 1/2)``. Returns 1.0 when both counts are 0.
    """
    if a_only < 0 or b_only < 0 or int(a_only) != a_only or int(b_only) != b_only:
        raise ValueError(f"discordant counts must be non-negative integers: {a_only}, {b_only}")
    n = int(a_only) + int(b_only)
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * _sps.binom.cdf(min(a_only, b_only), n, 0.5)))


def _count_extreme(signs: np.ndarray, d: np.ndarray, observed: float, tol: float) -> int:
    """How many sign rows give ``|signs @ d| >= observed`` (up to ``tol`` rounding slack)."""
    return int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))


def sign_flip_p_value(diffs, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> float:
    """Two-sided paired permutation test of ``mean(diffs) == 0`` by sign flips.

    Under the null each paired difference is symmetric about 0, so its sign is exchangeable.
    The statistic is ``|sum(s * d)|`` (equivalent to ``|mean|``) over the non-zero differences
    ``d`` (zeros are unchanged by a flip); the p-value is the share of sign vectors ``s`` whose
    statistic is at least the observed one (with a relative 1e-12 slack for float rounding).
    With m <= 16 non-zero differences all 2^m sign vectors are enumerated (exact p-value);
    otherwise ``resamples`` independent uniform sign vectors are drawn from
    ``np.random.default_rng(seed)`` and ``p = (count + 1) / (resamples + 1)``. All-zero (or
    empty) differences give 1.0.
    """
    _check_resamples(resamples)
    d = _as_finite(diffs, "diffs").ravel()
    d = d[d != 0]
    m = d.size
    if m == 0:
        return 1.0
    observed = abs(float(d.sum()))
    tol = 1e-12 * float(np.abs(d).sum())
    if m <= _EXACT_MAX:
        bits = (np.arange(2**m)[:, None] >> np.arange(m)) & 1
        return _count_extreme(1.0 - 2.0 * bits, d, observed, tol) / 2**m
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // m)
    count = 0
    for start in range(0, resamples, rows):
        k = min(rows, resamples - start)
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(k, m))
        count += _count_extreme(signs, d, observed, tol)
    return (count + 1) / (resamples + 1)


def paired_difference(
    a,
    b,
    *,
    groups=None,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedDifference:
    """Compare two methods scored on the same items (same order), e.g. per (seed, question) EM.

    ``diff``, ``low``, ``high``: :func:`bootstrap_mean_ci` of ``a - b``, i.e. a paired percentile
    bootstrap resampling items (pairs), stratified within ``groups`` when given; then ``diff`` is
    the mean of the per-group mean differences (the plain mean of ``a - b`` without groups, or
    with equal-sized groups). ``p_value`` (two-sided): when every entry of ``a`` and ``b`` is 0 or
    1, :func:`mcnemar_exact` on the discordant counts pooled over all items; otherwise
    :func:`sign_flip_p_value` of ``a - b`` pooled over all items (``groups`` do not enter the
    test). Shape mismatch or NaN raises ValueError.
    """
    x = _as_finite(a, "a")
    y = _as_finite(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("paired_difference needs at least one pair")
    ci = bootstrap_mean_ci(x - y, level=level, resamples=resamples, seed=seed, groups=groups)
    binary = bool(np.all((x == 0) | (x == 1)) and np.all((y == 0) | (y == 1)))
    if binary:
        a_only = int(np.count_nonzero((x == 1) & (y == 0)))
        b_only = int(np.count_nonzero((x == 0) & (y == 1)))
        p, test, discordant = mcnemar_exact(a_only, b_only), "mcnemar_exact", (a_only, b_only)
    else:
        p = sign_flip_p_value(x - y, resamples=resamples, seed=seed)
        test, discordant = "sign_flip_permutation", None
    return PairedDifference(ci.mean, ci.low, ci.high, p, test, int(x.size), discordant)
