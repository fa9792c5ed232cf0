"""The ridge probe: the closed form against direct solves, separable and shuffled labels; the
few-shot evaluator's draws and its result against a direct computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixer
from mixer import data, errors, models, probe


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


def test_shot_indices_are_k_per_class_nested_and_seeded():
  labels = np.repeat(np.arange(4), 5)[np.random.default_rng(0).permutation(20)]
  three = probe.shot_indices(labels, 4, 3, seed=7)
  assert three.shape == (4, 3) and len(set(three.ravel())) == 12
  assert all((labels[three[c]] == c).all() for c in range(4))
  np.testing.assert_array_equal(probe.shot_indices(labels, 4, 3, seed=7), three)
  assert not np.array_equal(probe.shot_indices(labels, 4, 3, seed=8), three)
  with pytest.raises(errors.DataError, match="needs 6 training examples of every class"):
    probe.shot_indices(labels, 4, 6, seed=7)


def test_fewshot_evaluator_equals_a_direct_computation():
  """k-shot top-1 from the model's pre-logits of the drawn images, solved directly."""
  model = mixer.create_model("Ti/8", 4, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                             channels_mlp_dim=16)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  rng = np.random.default_rng(0)
  split = lambda n: data.Split(images=rng.integers(0, 256, (n, 16, 16, 3), np.uint8),
                               labels=np.arange(n) % 4, class_names=list("abcd"))
  train, scored = split(24), split(13)
  evaluator = probe.FewShotEvaluator(model, train, scored, (2, 5), 16, batch_size=8, seed=3)
  results = evaluator(params)
  assert sorted(results) == ["fewshot/2shot", "fewshot/5shot"]
  pre_logits = lambda images: np.asarray(models.features(
      model, params, data.to_float(jnp.asarray(images), 16))[1]["pre_logits"], np.float64)
  for k in (2, 5):
    index = probe.shot_indices(train.labels, 4, 5, seed=3)[:, :k].reshape(-1)
    x = pre_logits(train.images[index])
    mean, std = x.mean(0), x.std(0) + 1e-5
    design = lambda f: np.pad((f - mean) / std, ((0, 0), (0, 1)),
                              constant_values=probe.BIAS_CONSTANT)
    targets = 2.0 * np.eye(4)[train.labels[index]] - 1.0
    a = design(x)
    w = a.T @ np.linalg.solve(a @ a.T + probe.FEWSHOT_L2 * np.eye(len(a)), targets)
    want = np.mean(np.argmax(design(pre_logits(scored.images)) @ w, 1) == scored.labels)
    assert results[f"fewshot/{k}shot"] == pytest.approx(want, abs=1e-12)


def test_training_logs_fewshot_metrics_at_evaluations(tmp_path):
  """fewshot_shots=(1, 2): fewshot/1shot and /2shot beside val/* at every evaluation, on the
  console's eval line; an unusable value is a ConfigError naming the key."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mixer import train_lib  # pylint: disable=g-import-not-at-top
  from tests.conftest import METADATA_DIR, read_metrics, tiny_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match="fewshot_shots"):
    train_lib.train_and_evaluate(tiny_config(fewshot_shots=(0, 5)), str(tmp_path / "bad"))
  # 1,000 mock examples give every one of the 100 classes at least 2.
  with tfds.testing.mock_data(num_examples=1000, data_dir=METADATA_DIR):
    train_lib.train_and_evaluate(
        tiny_config(fewshot_shots=(2, 1), total_steps=4, warmup_epochs=0.0, eval_every_steps=2,
                    eval_batch_size=256), str(tmp_path / "run"))
  rows = [r for r in read_metrics(str(tmp_path / "run")) if "fewshot/1shot" in r]
  assert [r["step"] for r in rows] == [2, 4]
  for row in rows:
    assert 0.0 <= row["fewshot/1shot"] <= 1.0 and 0.0 <= row["fewshot/2shot"] <= 1.0
  assert not (tmp_path / "bad").exists()


def test_eval_line_shows_the_fewshot_metrics_by_shots():
  from mixer.progress import eval_line  # pylint: disable=g-import-not-at-top
  line = eval_line(4, {"val/top1": 0.5, "val/loss": 1.0, "fewshot/10shot": 0.3,
                       "fewshot/2shot": 0.2}, 1.0)
  assert "val top1 50.00% loss 1.000 | fewshot 2shot 20.00% 10shot 30.00% |" in line
