"""The statistics of records, all from scipy.stats: the loss test, the speed-up test, intervals.

A build asks for thousands of tests, so the batched forms make one scipy call per sample size (or pair of
sizes). Samples without spread (where the t statistic is undefined) are decided by their means.
"""

from __future__ import annotations

import functools
import math
import statistics
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy import stats

SIGNIFICANCE_LEVEL = 0.01  # an ml record's mean final loss must be below the target at p < this ...
MIN_ML_RUNS = 3  # ... over at least this many finished runs
BEATS_SIGNIFICANCE_LEVEL = 0.05  # a record that beats another is faster at p < this (one-sided Welch t-test) ...
MIN_BEATS_RUNS = 3  # ... with at least this many finished runs on each side


def sd(values: list[float]) -> float:
    """The sample standard deviation of 2+ values (math.fsum sums; statistics.stdev is exact but 25x slower)."""
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_ci95(values: list[float]) -> tuple[float, float] | None:
    """The two-sided 95% t-interval of the mean; None with fewer than 2 values."""
    if len(values) < 2:
        return None
    mean, half = statistics.fmean(values), _t975(len(values) - 1) * sd(values) / math.sqrt(len(values))
    return mean - half, mean + half


@functools.lru_cache(maxsize=256)
def _t975(df: int) -> float:
    return float(stats.t.ppf(0.975, df))


def _quietly(test, *args, **options):
    """``test(*args, **options)`` without scipy's warning of precision loss on a sample without spread (one side of
    identical times, say), which its tests handle exactly: not news to print on every check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return test(*args, **options)


def _batched(samples: list[tuple], test, no_spread) -> list[float]:
    """test(*arrays) for every tuple of samples, one call per tuple of sizes; no_spread(*samples) where every
    sample is constant."""
    out, groups = [0.0] * len(samples), defaultdict(list)
    for i, sample in enumerate(samples):
        if all(len(set(s)) == 1 for s in sample):
            out[i] = no_spread(*sample)
        else:
            groups[tuple(len(s) for s in sample)].append(i)
    for index in groups.values():
        arrays = [np.array([samples[i][k] for i in index], dtype=np.float64) for k in range(len(samples[index[0]]))]
        for i, value in zip(index, _quietly(test, *arrays), strict=True):
            out[i] = value
    return out


def loss_p_values(samples: list[list[float]], targets: list[float]) -> list[float | None]:
    """For each sample, the p of ttest_1samp(sample, target, alternative="less"): is the mean loss below the
    target? None below 2 values."""
    tested = [i for i, s in enumerate(samples) if len(s) >= 2]
    p = _batched([(samples[i], [targets[i]]) for i in tested],
                 lambda x, t: stats.ttest_1samp(x, t, axis=1, alternative="less").pvalue,
                 lambda x, t: 0.0 if x[0] < t[0] else 1.0)
    out: list[float | None] = [None] * len(samples)
    for i, value in zip(tested, p, strict=True):
        out[i] = float(value)
    return out


def loss_p_value(losses: list[float], target: float) -> float | None:
    return loss_p_values([losses], [target])[0]


def speedup_p_values(pairs: list[tuple[list[float], list[float]]]) -> list[float]:
    """For each (times, baseline times), 2+ values each, the p of the one-sided Welch t-test that the times are
    smaller: ttest_ind(times, baseline, equal_var=False, alternative="less")."""
    return [float(p) for p in _batched(
        pairs, lambda a, b: stats.ttest_ind(a, b, axis=1, equal_var=False, alternative="less").pvalue,
        lambda a, b: 0.0 if a[0] < b[0] else 1.0)]


@dataclass
class Welch:
    difference: float  # mean(b) - mean(a)
    p_value: float  # two-sided
    ci95: tuple[float, float]


def welch_test(a: list[float], b: list[float]) -> Welch | None:
    """Welch's two-sided t-test of mean(b) - mean(a), with its 95% interval; None unless both have 2+ values."""
    if len(a) < 2 or len(b) < 2:
        return None
    difference = math.fsum(b) / len(b) - math.fsum(a) / len(a)
    if len(set(a)) == 1 and len(set(b)) == 1:
        return Welch(difference, 1.0 if difference == 0 else 0.0, (difference, difference))
    result = _quietly(stats.ttest_ind, b, a, equal_var=False)
    low, high = result.confidence_interval(0.95)
    return Welch(difference, float(result.pvalue), (float(low), float(high)))


def ratio_ci95s(pairs: list[tuple[list[float], list[float]]]) -> list[tuple[float, tuple[float, float] | None]]:
    """For each (a, b): the ratio of the geometric mean times b / a and its 95% interval (Welch on the logs; None
    unless both sides have 2+ values; without spread on both sides, the point)."""
    logs = [(np.log(np.asarray(a, dtype=np.float64)), np.log(np.asarray(b, dtype=np.float64))) for a, b in pairs]
    out = [(float(np.exp(lb.mean() - la.mean())), None) for la, lb in logs]
    groups = defaultdict(list)
    for i, (la, lb) in enumerate(logs):
        if len(la) >= 2 and len(lb) >= 2:
            groups[(len(la), len(lb))].append(i)
    for index in groups.values():
        la, lb = np.array([logs[i][0] for i in index]), np.array([logs[i][1] for i in index])
        ci = _quietly(lambda b, a: stats.ttest_ind(b, a, axis=1, equal_var=False).confidence_interval(0.95), lb, la)
        point = lb.mean(axis=1) - la.mean(axis=1)
        for k, i in enumerate(index):
            low, high = (ci.low[k], ci.high[k]) if np.isfinite(ci.low[k]) else (point[k], point[k])
            out[i] = (out[i][0], (math.exp(low), math.exp(high)))
    return out


def ratio_ci95(a: list[float], b: list[float]) -> tuple[float, tuple[float, float] | None]:
    return ratio_ci95s([(a, b)])[0]
