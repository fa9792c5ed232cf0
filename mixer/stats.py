"""Statistics of replicated runs: mean, 95% interval, Welch's test, one evaluation's error.

The interval is Student's t over the replicates (seeds) of a trial; it says how much the mean
would move with other seeds, not how well one evaluation measures a model (that is the
binomial standard error of its split, `binomial_se`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


@dataclasses.dataclass
class Sample:
  """n values; sd and the interval are None below n=2."""
  n: int
  mean: float | None
  sd: float | None
  ci_low: float | None
  ci_high: float | None


def describe(values: Sequence[float]) -> Sample:
  values = np.asarray(values, np.float64)
  n = len(values)
  if n == 0:
    return Sample(0, None, None, None, None)
  mean = float(values.mean())
  if n == 1:
    return Sample(1, mean, None, None, None)
  sd = float(values.std(ddof=1))
  if sd == 0:
    return Sample(n, mean, 0.0, mean, mean)
  low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sd / math.sqrt(n))
  return Sample(n, mean, sd, float(low), float(high))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
  """Two-sided p-value of Welch's t-test (means differ, variances not assumed equal); None
  when either side has fewer than 2 values or neither varies."""
  if len(a) < 2 or len(b) < 2:
    return None
  p = stats.ttest_ind(a, b, equal_var=False).pvalue
  return None if np.isnan(p) else float(p)


def binomial_se(accuracy: float, num_examples: int) -> float:
  """Standard error of an accuracy measured once on `num_examples` examples."""
  return math.sqrt(accuracy * (1 - accuracy) / num_examples)


def verdict(is_best: bool, n: int, best_n: int, p: float | None) -> str:
  """A comparison with the best group in words."""
  if n == 0:
    return "no finished run"
  if is_best:
    return f"best (n={n})"
  if n < 2 or best_n < 2:
    return f"not testable at n={n} against n={best_n}: run more seeds"
  if p is None:
    return f"not testable (no spread at n={n})"
  if p < ALPHA:
    return f"worse than the best (p={p:.3f}, n={n})"
  return f"not separable from the best at n={n} (p={p:.2f})"
