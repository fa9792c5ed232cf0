"""Linear probes on frozen features: closed-form ridge regression onto one-hot targets.

As big_vision's few-shot evaluator (`big_vision/evaluators/fewshot.py`) does: the features
are standardised with the training set's mean and standard deviation (+1e-5), a constant
feature BIAS_CONSTANT = 100 is appended (a bias that the penalty barely touches), the
targets are one-hot rescaled to {-1, 1}, and the weights are

  W = (X^T X + l2 I)^{-1} X^T Y      (N >= D)   or   X^T (X X^T + l2 I)^{-1} Y   (D > N),

computed for every l2 of a grid from one eigendecomposition of X^T X (or X X^T). A class is
predicted by the largest output. `fit_probe` picks the l2 with the best top-1 on a
validation set and reports the test top-1 at it. numpy, float64: the problems are small
(thousands of examples, at most a few thousand features).
"""
from __future__ import annotations

import dataclasses

import numpy as np

BIAS_CONSTANT = 100.0
L2_GRID = tuple(2.0 ** k for k in range(-10, 20))  # big_vision's few-shot grid


@dataclasses.dataclass
class Ridge:
  """A ridge regression problem prepared once, solvable for any l2."""
  mean: np.ndarray  # (1, D)
  std: np.ndarray  # (1, D)
  lhs: np.ndarray  # (D + 1, K)
  eigs: np.ndarray  # (K,)
  rhs: np.ndarray  # (K, C)

  def weights(self, l2: float) -> np.ndarray:
    """(D + 1, C): the solution at `l2`, the last row multiplying BIAS_CONSTANT."""
    return (self.lhs / (self.eigs + l2)[None, :]) @ self.rhs

  def design(self, x: np.ndarray) -> np.ndarray:
    """Features standardised as the training ones, with the constant bias feature."""
    x = (np.asarray(x, np.float64) - self.mean) / self.std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)

  def predict(self, x: np.ndarray, l2: float) -> np.ndarray:
    """(N, C) outputs for features x (N, D)."""
    return self.design(x) @ self.weights(l2)


def prepare(x: np.ndarray, labels: np.ndarray, num_classes: int) -> Ridge:
  """The eigendecomposition behind every l2's solution for features x (N, D), labels (N,)."""
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0, keepdims=True)
  std = x.std(axis=0, keepdims=True) + 1e-5
  ridge = Ridge(mean, std, np.empty(0), np.empty(0), np.empty(0))
  x = ridge.design(x)
  y = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
  if x.shape[0] >= x.shape[1]:
    ridge.eigs, q = np.linalg.eigh(x.T @ x)
    ridge.lhs, ridge.rhs = q, q.T @ (x.T @ y)
  else:
    ridge.eigs, q = np.linalg.eigh(x @ x.T)
    ridge.lhs, ridge.rhs = x.T @ q, q.T @ y
  return ridge


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of rows whose largest output is the label's."""
  return float(np.mean(np.argmax(outputs, axis=1) == np.asarray(labels)))


def fit_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
              test: tuple[np.ndarray, np.ndarray], num_classes: int,
              l2_grid: tuple[float, ...] = L2_GRID) -> dict[str, float]:
  """Fits on (features, labels) `train`, picks l2 by `val` top-1 (the smallest on a tie),
  returns {"l2", "val_top1", "test_top1", "train_top1"}."""
  ridge = prepare(*train, num_classes)
  val_top1 = [top1(ridge.predict(val[0], l2), val[1]) for l2 in l2_grid]
  best = int(np.argmax(val_top1))
  l2 = float(l2_grid[best])
  return {"l2": l2, "val_top1": val_top1[best],
          "test_top1": top1(ridge.predict(test[0], l2), test[1]),
          "train_top1": top1(ridge.predict(train[0], l2), train[1])}
