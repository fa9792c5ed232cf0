"""Data loading from TFDS, per-step batch indices, eval padding, and on-device augmentation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MOCK_EXAMPLES
from mixer import augment, data, optim
from conftest import tiny_config


def test_load_split_under_mock_data(mock_cifar):
  split = data.load_split("cifar100", "train")
  assert split.images.shape == (MOCK_EXAMPLES, 32, 32, 3) and split.images.dtype == np.uint8
  assert split.labels.dtype == np.int32 and split.labels.max() < 100
  assert split.num_classes == 100 and split.class_names[:2] == ["apple", "aquarium_fish"]
  assert len(split.coarse_names) == 20 and split.coarse_labels.shape == (MOCK_EXAMPLES,)


def batch_indices(seed, step, num_examples, batch_size):
  """Training step `step`'s example indices, straight from their definition."""
  epoch = step // data.steps_per_epoch(num_examples, batch_size)
  return data.indices_in_order(data.epoch_order(seed, epoch, num_examples), step, batch_size)


def test_batch_indices_are_a_pure_function_of_seed_and_step():
  n, b = 100, 32
  steps_per_epoch = data.steps_per_epoch(n, b)
  assert steps_per_epoch == 3
  get = jax.jit(lambda seed, step: batch_indices(seed, step, n, b), static_argnums=0)
  np.testing.assert_array_equal(get(0, 4), get(0, 4))
  assert not np.array_equal(get(0, 4), get(1, 4))
  epoch0 = np.concatenate([get(0, s) for s in range(3)])
  assert len(set(epoch0.tolist())) == 96, "no example twice within an epoch"
  epoch1 = np.concatenate([get(0, s) for s in range(3, 6)])
  assert not np.array_equal(epoch0, epoch1), "each epoch is a fresh permutation"


def test_epoch_orders_are_computed_once_per_epoch_and_match_batch_indices():
  from mixer import parallel  # pylint: disable=g-import-not-at-top
  n, b = 100, 32
  orders = data.EpochOrders(7, n, b, parallel.replicated(parallel.make_mesh()))
  first = orders(0, jnp.int32(0))
  assert orders(2, jnp.int32(2)) is first, "the same epoch reuses its order"
  for step in range(7):
    order = orders(step, jnp.int32(step))
    np.testing.assert_array_equal(data.indices_in_order(order, step, b),
                                  batch_indices(7, step, n, b))
  assert not np.array_equal(orders(3, jnp.int32(3)), first)


def test_batch_larger_than_dataset_is_an_error():
  with pytest.raises(ValueError, match="batch_size=64 is larger"):
    data.steps_per_epoch(10, 64)


def test_pad_to_multiple_keeps_every_example_once():
  split = data.Split(images=np.ones((10, 4, 4, 3), np.uint8), labels=np.arange(10, dtype=np.int32),
                     class_names=[str(i) for i in range(10)])
  images, labels, mask = data.pad_to_multiple(split, 4)
  assert images.shape[0] == 12 and mask.sum() == 10
  np.testing.assert_array_equal(labels[:10], np.arange(10))
  np.testing.assert_array_equal(mask[10:], 0)


def test_to_float_range_and_resize():
  x = jnp.array([[[[0, 255, 128]]]], jnp.uint8)
  np.testing.assert_allclose(data.to_float(x, 1)[0, 0, 0], [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)
  assert data.to_float(jnp.zeros((2, 8, 8, 3), jnp.uint8), 16).shape == (2, 16, 16, 3)


def test_random_crop_flip_is_keyed_and_shifts_content():
  images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.int32).reshape(2, 8, 8, 3).astype(jnp.uint8)
  a = augment.random_crop_flip(jax.random.key(0), images, padding=2)
  assert a.shape == images.shape and a.dtype == images.dtype
  np.testing.assert_array_equal(a, augment.random_crop_flip(jax.random.key(0), images, padding=2))
  outs = [augment.random_crop_flip(jax.random.key(s), images, padding=2) for s in range(8)]
  assert any(not np.array_equal(o, images) for o in outs)


def test_mixup_cutmix_targets_stay_distributions():
  images = jax.random.uniform(jax.random.key(0), (8, 8, 8, 3))
  targets = augment.soft_targets(jnp.arange(8) % 5, 5, 0.1)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  assert float(targets.max()) == pytest.approx(0.9 + 0.02)
  for mixup, cutmix in [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)]:
    for seed in range(3):
      x, t = augment.mixup_cutmix(jax.random.key(seed), images, targets, mixup, cutmix)
      assert x.shape == images.shape
      np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-5)
      assert not np.allclose(t, targets)
  x, t = augment.mixup_cutmix(jax.random.key(0), images, targets, 0.0, 0.0)
  assert x is images and t is targets


def test_cutmix_lambda_matches_pasted_area():
  images = jnp.zeros((2, 16, 16, 1)).at[1].set(1.0)  # example 0 gets pixels of example 1
  targets = jnp.eye(2)
  x, t = augment.mixup_cutmix(jax.random.key(3), images, targets, 0.0, 1.0)
  pasted = float(x[0].mean())
  np.testing.assert_allclose(t[0], [1 - pasted, pasted], atol=1e-6)


def test_schedule_warmup_then_cosine_to_zero():
  config = tiny_config(learning_rate=1.0, warmup_epochs=2.0)
  schedule = optim.learning_rate_schedule(config, total_steps=100, steps_per_epoch=10)
  assert float(schedule(0)) == 0.0 and float(schedule(20)) == pytest.approx(1.0)
  assert float(schedule(10)) == pytest.approx(0.5)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)
  assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)  # cosine midpoint


def test_weight_decay_applies_to_kernels_only():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
            "LayerNorm_0": {"scale": jnp.ones((2,))}}
  for name in ("adamw", "sgd"):
    config = tiny_config(optimizer=name, learning_rate=0.1, weight_decay=0.5, grad_clip_norm=0.0)
    tx = optim.make_optimizer(config, lambda step: 0.1)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["Dense_0"]["kernel"]).sum()) > 0, name
    assert float(jnp.abs(updates["Dense_0"]["bias"]).sum()) == 0, name
    assert float(jnp.abs(updates["LayerNorm_0"]["scale"]).sum()) == 0, name
