"""Timing shared by the benchmarks: the first call (compilation) apart from the median of the rest."""

import time

import numpy as np


def timed(fn, repeats):
  """(first-call seconds, median seconds of `repeats` later calls, result)."""
  t = time.perf_counter()
  result = fn()
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - t)
  return first, float(np.median(times)), result
