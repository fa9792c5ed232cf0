"""The ridge probe: the closed form against direct solves, separable and shuffled labels."""
import numpy as np
import pytest

from mixer import probe


def _problem(n, d, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d), rng.integers(0, classes, n)


@pytest.mark.parametrize("n,d", [(40, 6), (5, 12)])  # N >= D (eigh of X^T X) and D > N (X X^T)
@pytest.mark.parametrize("l2", [0.5, 8.0])
def test_ridge_equals_a_direct_solve(n, d, l2):
  x, labels = _problem(n, d)
  ridge = probe.prepare(x, labels, 3)
  design = (x - x.mean(0)) / (x.std(0) + 1e-5)
  design = np.concatenate([design, np.full((n, 1), probe.BIAS_CONSTANT)], axis=1)
  targets = 2.0 * np.eye(3)[labels] - 1.0
  direct = np.linalg.solve(design.T @ design + l2 * np.eye(d + 1), design.T @ targets)
  np.testing.assert_allclose(ridge.weights(l2), direct, rtol=1e-7, atol=1e-9)


def test_without_penalty_it_is_least_squares():
  x, labels = _problem(50, 4)
  ridge = probe.prepare(x, labels, 3)
  design = ridge.design(x)
  lstsq, *_ = np.linalg.lstsq(design, 2.0 * np.eye(3)[labels] - 1.0, rcond=None)
  np.testing.assert_allclose(ridge.weights(1e-12), lstsq, rtol=1e-6, atol=1e-8)


def _clusters(sizes, d, classes, seed=0):
  """[(features, labels)] for each size: points near one of `classes` shared centres."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, d)) * 4
  sets = []
  for n in sizes:
    labels = rng.integers(0, classes, n)
    sets.append((centers[labels] + rng.normal(size=(n, d)) * 0.3, labels))
  return sets


def test_separable_features_are_classified_perfectly():
  result = probe.fit_probe(*_clusters((600, 200, 200), 16, 10), num_classes=10)
  assert result["test_top1"] == result["val_top1"] == result["train_top1"] == 1.0


def test_shuffled_labels_give_chance():
  rng = np.random.default_rng(5)
  (x, y), (vx, vy), (tx, ty) = _clusters((2000, 2000, 4000), 16, 10)
  result = probe.fit_probe((x, rng.permutation(y)), (vx, rng.permutation(vy)),
                           (tx, rng.permutation(ty)), num_classes=10)
  assert abs(result["test_top1"] - 0.1) < 0.03  # chance: 0.1; 4000 examples: sd 0.005
  assert result["l2"] in probe.L2_GRID
