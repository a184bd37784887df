"""Whether one result beats another by more than the noise: the ablation's answers.

A difference between two retrieval runs is real only when it exceeds what
repeating the runs or drawing other queries would change. Each comparison
gives a 95% interval of the difference A - B and a verdict from it:

  "yes"           the whole interval is above 0 (A beats B),
  "no"            the whole interval is below 0 (B beats A),
  "within noise"  the interval holds 0.

* `compare_seeds`: paired over seeds (seed k of A against seed k of B, which
  share the seed's random draws): Student's t interval of the mean paired
  difference, the same decision as a two-sided paired t-test at 5%
  (scipy.stats.ttest_rel). Needs two or more seeds.
* `compare_queries`: a paired bootstrap over queries (both runs answered the
  same queries): the percentile interval of the mean per-query difference over
  10,000 resamples. It measures how the queries were drawn, not how training
  varies; the ablation uses it only for a one-seed run.
* `compare_proportions`: two accuracies over the same number of queries (one
  stage-1 run each): the normal-approximation interval of the difference of
  two proportions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats

LEVEL = 0.95
YES, NO, WITHIN = "yes", "no", "within noise"


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A - B: its estimate, a 95% interval, the verdict from it, and how it was measured."""
  difference: float
  low: float
  high: float
  verdict: str
  method: str

  def describe(self, unit: float = 100.0, suffix: str = " points") -> str:
    """"+1.23 points (95% interval +0.40 to +2.06; paired t over 3 seeds)"."""
    return (f"{unit * self.difference:+.2f}{suffix} (95% interval {unit * self.low:+.2f} to "
            f"{unit * self.high:+.2f}; {self.method})")


def verdict(low: float, high: float) -> str:
  """The rule: yes / no only when the interval excludes 0, else within noise."""
  if low > 0:
    return YES
  if high < 0:
    return NO
  return WITHIN


def compare_seeds(a, b, level: float = LEVEL) -> Comparison:
  """A against B paired over seeds: a[k] and b[k] come from the same seed k.

  Args:
    a: (n,) a score of A for each of n >= 2 seeds (e.g. mAP).
    b: (n,) the same score of B for the same seeds.
    level: the interval's coverage.
  """
  a, b = _paired(a, b, "a", "b")
  if a.size < 2:
    raise ValueError("compare_seeds needs two or more seeds; use compare_queries for one.")
  diff = a - b
  mean, n = float(diff.mean()), diff.size
  half = float(stats.t.ppf(0.5 + level / 2, n - 1) * diff.std(ddof=1) / np.sqrt(n))
  return Comparison(mean, mean - half, mean + half, verdict(mean - half, mean + half),
                    f"paired t over {n} seeds")


def compare_queries(a, b, resamples: int = 10_000, level: float = LEVEL,
                    seed: int = 0) -> Comparison:
  """A against B by a paired bootstrap over queries.

  Args:
    a: (q,) per-query scores of A (e.g. average precisions); NaN rows (a query
      without a relevant item) are left out of both.
    b: (q,) the same queries' scores of B.
    resamples: bootstrap resamples.
    level: the interval's coverage (percentile interval).
    seed: the resampling's seed (the result is deterministic).
  """
  a, b = _paired(a, b, "a", "b")
  keep = ~(np.isnan(a) | np.isnan(b))
  diff = (a - b)[keep]
  if diff.size == 0:
    raise ValueError("compare_queries needs at least one query scored by both.")
  rng = np.random.default_rng(seed)
  means = np.empty(resamples)
  for start in range(0, resamples, 1000):  # bounded memory: 1,000 resamples at a time
    rows = rng.integers(0, diff.size, (min(1000, resamples - start), diff.size))
    means[start:start + len(rows)] = diff[rows].mean(axis=1)
  low, high = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
  return Comparison(float(diff.mean()), float(low), float(high), verdict(low, high),
                    f"paired bootstrap over {diff.size} queries")


def compare_proportions(p_a: float, p_b: float, n: int, level: float = LEVEL) -> Comparison:
  """Two accuracies, each over the same `n` queries: p_a - p_b with a normal interval."""
  if n < 1:
    raise ValueError(f"n must be a positive number of queries, got {n}.")
  for name, p in (("p_a", p_a), ("p_b", p_b)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name} must be a fraction in [0, 1], got {p}.")
  diff = float(p_a - p_b)
  se = np.sqrt((p_a * (1 - p_a) + p_b * (1 - p_b)) / n)
  half = float(stats.norm.ppf(0.5 + level / 2) * se)
  return Comparison(diff, diff - half, diff + half, verdict(diff - half, diff + half),
                    f"two proportions over {n} queries each")


def _paired(a, b, name_a: str, name_b: str):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"{name_a} and {name_b} must pair up: got {a.size} and {b.size} values.")
  return a, b
