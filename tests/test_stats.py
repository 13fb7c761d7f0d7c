"""A/B statistics on known inputs."""

import random

import pytest

from reasonmaxxer.clients.stats import bootstrap_mean, mcnemar_exact, paired_bootstrap, percentiles, wilson


def test_mcnemar_on_a_fixed_table():
    # 2x2 table: both right 10, only A right 2, only B right 8, both wrong 30.
    a = [1] * 10 + [1] * 2 + [0] * 8 + [0] * 30
    b = [1] * 10 + [0] * 2 + [1] * 8 + [0] * 30
    # Exact: 2 * P[Binomial(10, 1/2) <= 2] = 2 * 56 / 1024.
    assert mcnemar_exact(a, b) == pytest.approx(112 / 1024)
    assert mcnemar_exact(a, a) == 1.0
    assert mcnemar_exact([1] * 5 + [0] * 5, [0] * 5 + [1] * 5) == 1.0  # 5 vs 5 discordant: no evidence


def test_wilson_matches_the_textbook_value():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_paired_bootstrap_covers_the_true_difference():
    rng = random.Random(1)
    groups, a, b = [], [], []
    for p in range(200):
        base = rng.random() * 0.8
        for _ in range(4):
            groups.append(f"p{p}")
            a.append(float(rng.random() < base))
            b.append(float(rng.random() < base + 0.1))
    diff, (lo, hi) = paired_bootstrap(a, b, groups, seed=3)
    assert lo < 0.1 < hi and lo > 0  # covers the true +0.1 and excludes 0
    assert paired_bootstrap(a, b, groups, seed=3) == (diff, (lo, hi))  # seeded: reproducible
    mean, (mlo, mhi) = bootstrap_mean(a, groups)
    assert mlo < mean < mhi


def test_percentiles():
    assert percentiles([1, 2, 3, 4, 5], (50, 100)) == {"p50": 3, "p100": 5}
