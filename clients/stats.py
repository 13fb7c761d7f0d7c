"""Statistics of an A/B comparison, as pure functions on 0/1 outcomes.

Contract:
- `wilson(k, n)`: the 95% Wilson score interval of a proportion.
- `bootstrap_mean(outcomes, groups)`: pass@1 with a 95% percentile interval from resampling *problems*
  (the samples of one problem are correlated; resampling whole problems respects that).
- `paired_bootstrap(a, b, groups)`: the mean of b - a over paired outcomes (same problem, same sample
  seed) with a 95% interval, resampling problems.
- `mcnemar_exact(a, b)`: the exact two-sided McNemar p-value on paired outcomes: with b01 pairs where only
  b succeeds and b10 where only a does, p = min(1, 2 * P[X <= min(b01, b10)]), X ~ Binomial(b01 + b10, 1/2).
- `percentiles(values, qs)`.
Randomness comes from an explicit seed; the same inputs and seed give the same interval.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

__all__ = ["bootstrap_mean", "mcnemar_exact", "paired_bootstrap", "percentiles", "wilson"]

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _by_group(values: Sequence[float], groups: Sequence[str]) -> list[list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for v, g in zip(values, groups, strict=True):
        out[g].append(v)
    return list(out.values())


def _resampled_means(clusters: list[list[float]], rounds: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    means = []
    for _ in range(rounds):
        pick = [clusters[rng.randrange(len(clusters))] for _ in clusters]
        total, count = sum(sum(c) for c in pick), sum(len(c) for c in pick)
        means.append(total / count)
    return sorted(means)


def _interval(sorted_means: list[float], level: float = 0.95) -> tuple[float, float]:
    lo = sorted_means[math.floor((1 - level) / 2 * (len(sorted_means) - 1))]
    hi = sorted_means[math.ceil((1 + level) / 2 * (len(sorted_means) - 1))]
    return lo, hi


def bootstrap_mean(outcomes: Sequence[float], groups: Sequence[str], rounds: int = 2000,
                   seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean outcome and its 95% interval, resampling groups (problems)."""
    if not outcomes:
        return 0.0, (0.0, 1.0)
    mean = sum(outcomes) / len(outcomes)
    return mean, _interval(_resampled_means(_by_group(outcomes, groups), rounds, seed))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], groups: Sequence[str], rounds: int = 2000,
                     seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean of b - a over pairs and its 95% interval, resampling groups (problems)."""
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    return bootstrap_mean(diffs, groups, rounds, seed)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided McNemar p-value for paired 0/1 outcomes."""
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q:g}": float("nan") for q in qs}
    v = sorted(values)
    out = {}
    for q in qs:
        pos = (len(v) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{q:g}"] = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    return out
