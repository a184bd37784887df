"""The answer rule: yes / no only when the difference exceeds the noise, on constructed numbers."""

import numpy as np
import pytest
from scipy import stats

from fgir_jax import significance


def test_consistent_seed_gains_are_yes_and_losses_no():
  a, b = [0.750, 0.762, 0.741], [0.700, 0.715, 0.690]
  assert significance.compare_seeds(a, b).verdict == "yes"
  assert significance.compare_seeds(b, a).verdict == "no"


def test_a_gain_smaller_than_the_seed_spread_is_within_noise():
  # Mean gain +1 point, but one seed goes the other way by more.
  a, b = [0.75, 0.70, 0.74], [0.72, 0.74, 0.70]
  c = significance.compare_seeds(a, b)
  assert c.verdict == "within noise" and c.low < 0 < c.high
  assert c.difference == pytest.approx(0.01)


def test_seed_interval_is_the_paired_t_interval_and_agrees_with_ttest_rel():
  rng = np.random.default_rng(0)
  for _ in range(50):
    n = int(rng.integers(2, 6))
    b = rng.uniform(0.6, 0.8, n)
    a = b + rng.normal(rng.uniform(-0.02, 0.02), 0.01, n)
    c = significance.compare_seeds(a, b)
    diff = [x - y for x, y in zip(a, b)]  # by hand: mean +- t * s / sqrt(n)
    mean = sum(diff) / n
    s = (sum((d - mean) ** 2 for d in diff) / (n - 1)) ** 0.5
    half = stats.t.ppf(0.975, n - 1) * s / n ** 0.5
    assert (c.low, c.high) == pytest.approx((mean - half, mean + half))
    p = stats.ttest_rel(a, b).pvalue
    assert (c.verdict != "within noise") == (p < 0.05)


def test_identical_runs_are_within_noise_and_one_seed_is_refused():
  assert significance.compare_seeds([0.7, 0.7], [0.7, 0.7]).verdict == "within noise"
  with pytest.raises(ValueError, match="two or more seeds"):
    significance.compare_seeds([0.7], [0.6])
  with pytest.raises(ValueError, match="must pair up"):
    significance.compare_seeds([0.7, 0.8], [0.6, 0.6, 0.6])


def test_query_bootstrap_matches_a_loop_and_decides_by_the_interval():
  rng = np.random.default_rng(1)
  b = rng.uniform(0, 1, 300)
  a = np.clip(b + 0.05 + rng.normal(0, 0.05, 300), 0, 1)  # better on almost every query
  c = significance.compare_queries(a, b, resamples=2000, seed=3)
  assert c.verdict == "yes"
  # The same resamples drawn by hand, in the same order, give the same interval.
  draw = np.random.default_rng(3)
  means = [np.mean((a - b)[draw.integers(0, 300, (1000, 300))], axis=1) for _ in range(2)]
  low, high = np.quantile(np.concatenate(means), [0.025, 0.975])
  assert (c.low, c.high) == pytest.approx((low, high))
  noise = rng.normal(0, 0.2, 300)
  assert significance.compare_queries(b + noise - noise.mean(), b).verdict == "within noise"


def test_query_bootstrap_leaves_out_queries_without_relevant_items():
  a = np.array([0.9, np.nan, 0.8, 0.7])
  b = np.array([0.5, 0.5, np.nan, 0.6])
  c = significance.compare_queries(a, b, resamples=100)
  assert c.difference == pytest.approx(((0.9 - 0.5) + (0.7 - 0.6)) / 2)
  assert "over 2 queries" in c.method


def test_proportions_interval():
  c = significance.compare_proportions(0.78, 0.72, 1389)
  se = np.sqrt((0.78 * 0.22 + 0.72 * 0.28) / 1389)
  assert (c.low, c.high) == pytest.approx((0.06 - 1.959964 * se, 0.06 + 1.959964 * se), rel=1e-5)
  assert c.verdict == "yes"
  assert significance.compare_proportions(0.78, 0.77, 1389).verdict == "within noise"
  with pytest.raises(ValueError, match="fraction"):
    significance.compare_proportions(78.0, 72.0, 100)


def test_describe_says_the_difference_interval_and_method():
  c = significance.Comparison(0.0123, 0.004, 0.0206, "yes", "paired t over 3 seeds")
  assert c.describe() == "+1.23 points (95% interval +0.40 to +2.06; paired t over 3 seeds)"
