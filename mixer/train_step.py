"""The jitted training step: gather a batch by (seed, step), augment it, update the state.

`make_train_step(model, tx, config, num_classes, mesh)` returns
`(state, train_images, train_labels, order) -> (state, [loss, top1, grad_norm])`: the
step's examples are rows `data.indices_in_order(order, step)` of the device-resident split,
sharded along the mesh's `data` axis, augmented with keys of the augmentation stream at
(seed, step) (`rng_streams`), and the replicated parameters and their EMA are updated.
Imports neither clu, ml_collections nor TensorFlow.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from mixer import augment, data, metrics, models, parallel, randaugment, rng_streams

Config = Any  # an ml_collections.ConfigDict of config_lib.base_config()'s keys


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of updates applied so far, int32
  params: Any
  opt_state: Any
  ema_params: Any = None  # exponential moving average of params; None when ema_decay == 0


def new_state(params: Any, tx: optax.GradientTransformation, ema_decay: float) -> TrainState:
  """Step 0: the optimizer's initial state, and the EMA (when kept) starting at `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params if ema_decay else None)


def make_batch_fn(config: Config, num_classes: int,
                  shard: Callable[[jax.Array], jax.Array] = lambda x: x) -> Callable:
  """(step, train_images, train_labels, order) -> (images, soft targets, labels, dropout key).

  Gathers step `step`'s examples from its epoch's `order` (`EpochOrders`), applies `shard` to
  them (a sharding constraint), and augments them with rngs folded from (seed, step). Jittable.
  """
  def batch_fn(step, all_images, all_labels, order):
    indices = data.indices_in_order(order, step, config.batch_size)
    images, labels = shard(all_images[indices]), shard(all_labels[indices])
    k_crop, k_rand, k_erase, k_mix = jax.random.split(
        rng_streams.key(config.seed, rng_streams.AUGMENT, step), 4)
    if config.augment:
      images = augment.random_crop_flip(k_crop, images)
    if config.randaugment_ops:
      images = randaugment.rand_augment(k_rand, images, config.randaugment_ops,
                                        config.randaugment_magnitude)
    images = data.to_float(images, config.image_size)
    if config.random_erasing:
      images = randaugment.random_erasing(k_erase, images, config.random_erasing)
    targets = augment.soft_targets(labels, num_classes, config.label_smoothing)
    images, targets = augment.mixup_cutmix(k_mix, images, targets, config.mixup_alpha,
                                           config.cutmix_alpha)
    return images, targets, labels, rng_streams.key(config.seed, rng_streams.DROPOUT, step)
  return batch_fn


def make_loss_fn(model: models.MlpMixer) -> Callable:
  """(params, images, targets, labels, dropout key) -> (mean loss, top-1)."""
  def loss_fn(params, images, targets, labels, key):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
    loss = metrics.cross_entropy(logits, targets).mean()
    return loss, metrics.topk_correct(logits, labels, 1).mean()
  return loss_fn


def make_train_step(model: models.MlpMixer, tx: optax.GradientTransformation,
                    config: Config, num_classes: int,
                    mesh: jax.sharding.Mesh) -> Callable:
  """(state, train_images, train_labels, order) -> (state, [loss, top1, grad_norm]).

  `order` is the epoch order of state.step's epoch (`EpochOrders`)."""
  batch, accum = config.batch_size, config.grad_accum_steps
  grad_fn = jax.value_and_grad(make_loss_fn(model), has_aux=True)
  batch_fn = make_batch_fn(config, num_classes, shard=lambda x: (
      jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh))))

  def accumulated_grads(params, images, targets, labels, key):
    # Microbatch i takes rows i, i+accum, ...: each device keeps its own rows.
    split = lambda x: jax.lax.with_sharding_constraint(
        x.reshape((batch // accum, accum) + x.shape[1:]).swapaxes(0, 1),
        parallel.batch_sharded(mesh, leading_dims=1))
    def body(carry, micro):
      i, x, t, y = micro
      (loss, top1), grads = grad_fn(params, x, t, y, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (loss, top1, grads)), None
    zeros = (0.0, 0.0, jax.tree.map(jnp.zeros_like, params))
    micro = (jnp.arange(accum), split(images), split(targets), split(labels))
    (loss, top1, grads), _ = jax.lax.scan(body, zeros, micro)
    return (loss / accum, top1 / accum), jax.tree.map(lambda g: g / accum, grads)

  def train_step(state: TrainState, all_images: jax.Array, all_labels: jax.Array,
                 order: jax.Array):
    images, targets, labels, k_drop = batch_fn(state.step, all_images, all_labels, order)
    if accum == 1:
      (loss, top1), grads = grad_fn(state.params, images, targets, labels, k_drop)
    else:
      (loss, top1), grads = accumulated_grads(state.params, images, targets, labels, k_drop)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if config.ema_decay:
      ema = optax.incremental_update(params, ema, step_size=1.0 - config.ema_decay)
    new_state = state.replace(step=state.step + 1, opt_state=opt_state, params=params,
                              ema_params=ema)
    return new_state, jnp.stack([loss, top1, optax.tree.norm(grads)])

  return train_step
