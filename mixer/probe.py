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

`FeaturePass` computes the frozen features (`models.features`, mean-pooled) of uint8 images;
`FewShotEvaluator` is the k-shot metric a training run logs beside val/* when
config.fewshot_shots is set: for each k, a probe on the pre-logits of k training images per
class, scored on config.fewshot_split (default: the val split, else the eval split) at
big_vision's fixed penalty FEWSHOT_L2 (nothing is tuned on the split it is scored on).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mixer import data, errors, models, parallel

BIAS_CONSTANT = 100.0
L2_GRID = tuple(2.0 ** k for k in range(-10, 20))  # big_vision's few-shot grid
FEWSHOT_L2 = 2.0 ** 10  # big_vision's few-shot configs' l2_reg
FEWSHOT_PREFIX = "fewshot"


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


class FeaturePass:
  """(logits (N, C), {name: (N, hidden) float32}) of uint8 images: every representation of
  `models.features` from one jitted application per batch, split over this process's devices.
  Compiled once per instance: call it at every evaluation of a run."""

  def __init__(self, model: models.MlpMixer, image_size: int, batch_size: int):
    self.mesh = parallel.make_mesh()
    self.batch_size = -(-batch_size // self.mesh.devices.size) * self.mesh.devices.size
    self.names = models.feature_names(model.num_blocks)
    self._step = jax.jit(lambda p, x: models.features(model, p, data.to_float(x, image_size)),
                         out_shardings=parallel.replicated(self.mesh))

  def __call__(self, params: Any, images: np.ndarray,
               progress: Callable[[int, int], None] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`progress(done, total)` after each batch."""
    params = jax.device_put(params, parallel.replicated(self.mesh))
    n, size = len(images), self.batch_size
    logits, feats = [], {name: [] for name in self.names}
    for start in range(0, n, size):
      batch = images[start:start + size]
      pad = size - len(batch)
      if pad:
        batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
      out_logits, out = jax.device_get(self._step(params, jax.device_put(
          batch, parallel.batch_sharded(self.mesh))))
      logits.append(np.asarray(out_logits[:size - pad], np.float32))
      for name in feats:
        feats[name].append(np.asarray(out[name][:size - pad], np.float32))
      if progress is not None:
        progress(min(start + size, n), n)
    return (np.concatenate(logits), {name: np.concatenate(p) for name, p in feats.items()})


def shot_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
  """`shots` indices per class (class-major), drawn without replacement by `seed`; the first
  k of each class's draw are also the k-shot draw for every k < shots."""
  labels = np.asarray(labels)
  order = np.random.default_rng(seed).permutation(len(labels))
  picked = [order[labels[order] == c][:shots] for c in range(num_classes)]
  short = [c for c, idx in enumerate(picked) if len(idx) < shots]
  if short:
    raise errors.DataError(f"fewshot_shots needs {shots} training examples of every class; "
                           f"{len(short)} class(es) have fewer (e.g. class {short[0]}).")
  return np.stack(picked)  # (classes, shots)


class FewShotEvaluator:
  """{'fewshot/<k>shot': top-1} for each k of `shots`: ridge probes on the pre-logits of k
  training images per class (drawn once, by `seed`), scored on every image of `split`."""

  def __init__(self, model: models.MlpMixer, train: data.Split, split: data.Split,
               shots: Sequence[int], image_size: int, batch_size: int, seed: int,
               l2: float = FEWSHOT_L2):
    self.shots, self.l2, self.split = sorted(set(shots)), l2, split
    self.num_classes = train.num_classes
    self.index = shot_indices(train.labels, self.num_classes, self.shots[-1], seed)
    self.images = train.images[self.index.reshape(-1)]
    self.labels = np.asarray(train.labels)[self.index.reshape(-1)]
    self.features = FeaturePass(model, image_size, batch_size)

  def seconds_per_call(self, params: Any, clock: Callable[[], float]) -> float:
    """What one call costs (`clock` in seconds), timed after a first, compiling call."""
    self(params)
    start = clock()
    self(params)
    return clock() - start

  def __call__(self, params: Any) -> dict[str, float]:
    _, train = self.features(params, self.images)
    _, scored = self.features(params, self.split.images)
    per_class = self.shots[-1]
    results = {}
    for k in self.shots:
      rows = (np.arange(self.num_classes)[:, None] * per_class + np.arange(k)).reshape(-1)
      ridge = prepare(train["pre_logits"][rows], self.labels[rows], self.num_classes)
      results[f"{FEWSHOT_PREFIX}/{k}shot"] = top1(
          ridge.predict(scored["pre_logits"], self.l2), self.split.labels)
    return results
