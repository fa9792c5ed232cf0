"""Training and evaluation: the jitted steps and `train_and_evaluate(config, workdir)`.

Data flow: TFDS split -> uint8 host arrays -> replicated on every device (once) -> each
step gathers its slice of the epoch's permutation (`EpochOrders`, computed on the device
once per epoch; `data.indices_in_order`) inside the jitted step, shards the examples along
the mesh's `data` axis, augments them with keys of the augmentation stream at (seed, step)
(`rng_streams`), and updates the replicated parameters and their EMA. The host only syncs
at log, eval and checkpoint steps.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import periodic_actions

from mixer import (augment, checkpoints, config_lib, data, metrics, models, optim, parallel,
                   pretrained, randaugment, rng_streams)


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


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> models.MlpMixer:
  m = config.model
  dims = {k: m[k] for k in ("hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim")}
  dtype = models.resolve_dtype(m.dtype, jax.default_backend())
  return models.create_model(m.variant, num_classes, stoch_depth=m.stoch_depth,
                             dropout=m.dropout, dtype=dtype, **dims)


def init_params(model: models.MlpMixer, image_size: int, seed: int) -> Any:
  key = rng_streams.key(seed, rng_streams.INIT)
  return model.init(key, jnp.zeros((1, image_size, image_size, 3)), train=False)["params"]


def make_batch_fn(config: ml_collections.ConfigDict, num_classes: int,
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
                    config: ml_collections.ConfigDict, num_classes: int,
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


class EpochOrders:
  """Each epoch's example order (data.epoch_order), computed on the devices once per epoch.

  Called with the host's step number and the state's step array before each train step: the
  order is recomputed from the device array when the epoch changes, so nothing is copied from
  the host and resuming mid-epoch rebuilds the same order.
  """

  def __init__(self, seed: int, num_examples: int, batch_size: int, mesh: jax.sharding.Mesh):
    self.per_epoch = data.steps_per_epoch(num_examples, batch_size)
    self._compute = jax.jit(
        lambda step: data.epoch_order(seed, step // self.per_epoch, num_examples),
        out_shardings=parallel.replicated(mesh))
    self._epoch: int | None = None
    self._order: jax.Array | None = None

  def __call__(self, step: int, step_array: jax.Array) -> jax.Array:
    """The order for 0-based step `step` (== step_array, the state's step)."""
    if step // self.per_epoch != self._epoch:
      self._epoch, self._order = step // self.per_epoch, self._compute(step_array)
    return self._order


def predict_logits(model: models.MlpMixer, params: Any, images: jax.Array,
                   flip: bool = False) -> jax.Array:
  """float32 logits of float images; with `flip`, the mean of the image's and its mirror's."""
  logits = model.apply({"params": params}, images, train=False).astype(jnp.float32)
  if flip:
    mirrored = model.apply({"params": params}, images[:, :, ::-1, :], train=False)
    logits = (logits + mirrored.astype(jnp.float32)) / 2
  return logits


def make_eval_step(model: models.MlpMixer, image_size: int, batch_size: int,
                   mesh: jax.sharding.Mesh, flip: bool = False) -> Callable:
  """(params, images, labels, mask, index) -> logits and masked sums of loss/top1/top5/count."""
  def eval_step(params, all_images, all_labels, all_mask, index):
    shard = lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh))
    images, labels, mask = map(shard, data.eval_batch(all_images, all_labels, all_mask, index,
                                                      batch_size))
    logits = predict_logits(model, params, data.to_float(images, image_size), flip)
    loss = metrics.cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    top5 = metrics.topk_correct(logits, labels, min(5, logits.shape[-1]))
    sums = jnp.stack([jnp.sum(loss * mask), jnp.sum(metrics.topk_correct(logits, labels, 1) * mask),
                      jnp.sum(top5 * mask), jnp.sum(mask)])
    return logits, sums
  return eval_step


class Evaluator:
  """Evaluates params on a whole split, each example exactly once (padded batches + mask).

  The batch size is rounded up to a multiple of the device count. Metrics are named
  `{prefix}/loss`, `{prefix}/top1`, ...; `flip` averages each image's and its mirror's logits.
  """

  def __init__(self, model: models.MlpMixer, split: data.Split, image_size: int, batch_size: int,
               mesh: jax.sharding.Mesh, flip: bool = False, prefix: str = "eval"):
    self.prefix = prefix
    devices = mesh.devices.size
    batch_size = -(-batch_size // devices) * devices  # padding absorbs the rounding up
    images, labels, mask = data.pad_to_multiple(split, batch_size)
    self.arrays = [parallel.put_replicated(a, mesh) for a in (images, labels, mask)]
    self.num_batches = len(labels) // batch_size
    self.num_examples = len(split)
    self.step = jax.jit(make_eval_step(model, image_size, batch_size, mesh, flip),
                        out_shardings=parallel.replicated(mesh))

  def __call__(self, params: Any, keep_logits: bool = False) -> dict[str, Any]:
    sums, logits = 0.0, []
    for i in range(self.num_batches):
      batch_logits, batch_sums = self.step(params, *self.arrays, np.int32(i))
      sums = sums + batch_sums
      if keep_logits:
        logits.append(batch_logits)
    loss, top1, top5, count = np.asarray(jax.device_get(sums), np.float64)
    p = self.prefix
    result = {f"{p}/loss": loss / count, f"{p}/top1": top1 / count, f"{p}/top5": top5 / count,
              f"{p}/num_examples": int(count)}
    if keep_logits:
      result["logits"] = np.concatenate(jax.device_get(logits))[: self.num_examples]
    return result


class _StopSignal:
  """Records SIGTERM so that the loop can finish its step, save and exit cleanly."""

  def __init__(self):
    self.received = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: finishing the current step, then saving.")
    self.received = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if old != new:
      logging.warning("The config differs from the one in %s; continuing with the new one.", path)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(new, f, indent=2, sort_keys=True)


def load_initial_params(config: ml_collections.ConfigDict, model: models.MlpMixer,
                        mesh: jax.sharding.Mesh) -> Any:
  """Parameters from `config.init_from` (a published-layout .npz), checked and adapted."""
  template = jax.eval_shape(lambda: init_params(model, config.image_size, config.seed))
  num_tokens = (config.image_size // model.patch_size) ** 2
  try:
    params = pretrained.load_pretrained(config.init_from, template, num_tokens=num_tokens)
  except ValueError as e:
    raise ValueError(f"config.init_from={config.init_from!r} does not fit config.model "
                     f"({config.model.variant} at image_size {config.image_size}): {e}") from None
  logging.info("Initialised from %s.", config.init_from)
  return jax.tree.map(lambda x: parallel.put_replicated(np.asarray(x), mesh), params)


def _save_class_names(split: data.Split, workdir: str) -> None:
  """Label names for evaluation and prediction without the dataset at hand."""
  names = {"label": split.class_names}
  if split.coarse_names:
    names["coarse_label"] = split.coarse_names
  with open(os.path.join(workdir, "class_names.json"), "w", encoding="utf-8") as f:
    json.dump(names, f, indent=1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) a run in `workdir`; returns the final evaluation metrics."""
  config_lib.validate(config)
  mesh = parallel.make_mesh()
  parallel.check_divisible(config.batch_size // config.grad_accum_steps, mesh,
                           "batch_size // config.grad_accum_steps")
  os.makedirs(workdir, exist_ok=True)
  train_split = data.load_split(config.dataset, config.train_split, config.data_dir)
  eval_split = data.load_split(config.dataset, config.eval_split, config.data_dir)
  val_split = None
  if config.val_split:
    val_split = data.load_split(config.dataset, config.val_split, config.data_dir)
    data.check_disjoint(train_split, val_split, config.train_split, config.val_split)
  per_epoch = data.steps_per_epoch(len(train_split), config.batch_size)
  total_steps = config.total_steps if config.total_steps > 0 else config.num_epochs * per_epoch
  optim.check_warmup(config, total_steps, per_epoch)
  model = build_model(config, train_split.num_classes)
  schedule = optim.learning_rate_schedule(config, total_steps, per_epoch)
  tx = optim.make_optimizer(config, schedule)

  state_from = lambda params: new_state(params, tx, config.ema_decay)
  create_state = lambda: state_from(init_params(model, config.image_size, config.seed))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
      jax.eval_shape(create_state))
  ckpt = checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints)
  restored = ckpt.restore_latest_good(abstract)
  start_step, state = restored if restored else (0, None)
  if start_step >= total_steps:
    logging.info("Run in %s already finished (step %d of %d); nothing to do.", workdir,
                 start_step, total_steps)
    ckpt.close()
    return {"step": start_step, "already_finished": True}
  if state is None and config.init_from:
    params = load_initial_params(config, model, mesh)
    state = jax.jit(state_from, out_shardings=parallel.replicated(mesh))(params)
  elif state is None:
    state = jax.jit(create_state, out_shardings=parallel.replicated(mesh))()
  else:
    logging.info("Resuming from the checkpoint at step %d.", start_step)
  if jax.process_index() == 0:
    _save_config(config, workdir)
    _save_class_names(train_split, workdir)
    metrics.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), start_step)
  writer = metrics.create_writer(workdir)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Mixer %s: %d parameters; %d steps (%d per epoch), batch %d on %d device(s).",
               config.model.variant, num_params, total_steps, per_epoch, config.batch_size,
               mesh.devices.size)

  train_images = parallel.put_replicated(train_split.images, mesh)
  train_labels = parallel.put_replicated(train_split.labels, mesh)
  evaluators = {name: Evaluator(model, split, config.image_size, config.eval_batch_size, mesh,
                                flip=config.eval_flip, prefix=name)
                for name, split in (("val", val_split), ("eval", eval_split)) if split}
  if config.ema_decay or config.eval_flip:
    logging.info("Evaluating %s.", " with ".join(filter(None, [
        "the EMA parameters" if config.ema_decay else "the parameters",
        "flip test-time augmentation" if config.eval_flip else ""])))
  step_fn = jax.jit(
      make_train_step(model, tx, config, train_split.num_classes, mesh),
      donate_argnums=0, out_shardings=parallel.replicated(mesh))
  orders = EpochOrders(config.seed, len(train_split), config.batch_size, mesh)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  stop = _StopSignal()
  pending, pending_from = [], start_step + 1  # device metrics not yet checked, from this step
  window_start, window_time = start_step, time.time()
  eval_result: dict[str, Any] = {}
  try:
    for step in range(start_step + 1, total_steps + 1):
      order = orders(step - 1, state.step)
      state, step_metrics = step_fn(state, train_images, train_labels, order)
      pending.append(step_metrics)
      if step == start_step + 1:  # Keep compilation out of img/s.
        jax.block_until_ready(state)
        logging.info("First step (with compilation) took %.1fs.", time.time() - window_time)
        window_start, window_time = step, time.time()
      report(step)
      is_last, stopping = step == total_steps, stop.received
      eval_due = step % config.eval_every_steps == 0 or is_last
      save_due = step % config.checkpoint_every_steps == 0 or is_last or stopping
      if pending and (step % config.log_every_steps == 0 or eval_due or save_due):
        loss, top1, grad_norm = np.mean(jax.device_get(pending), axis=0)
        if not np.isfinite(loss):
          raise FloatingPointError(
              f"Training loss became non-finite between steps {pending_from} and {step}; "
              f"stopping. The last good checkpoint (step {ckpt.latest_step()}) is kept. Try a "
              "lower learning_rate or grad_clip_norm.")
        scalars = {"train/loss": loss, "train/top1": top1, "grad_norm": grad_norm,
                   "lr": float(schedule(step - 1))}
        if step > window_start:
          scalars["img_per_sec"] = ((step - window_start) * config.batch_size
                                    / (time.time() - window_time))
        writer.write_scalars(step, scalars)
        pending, pending_from = [], step + 1
      step_eval = None
      if eval_due:
        eval_params = state.ema_params if config.ema_decay else state.params
        step_eval = {}
        for name, evaluator in evaluators.items():
          step_eval.update(evaluator(eval_params))
          logging.info("Step %d: %s/top1 %.4f, %s/loss %.4f.", step, name,
                       step_eval[f"{name}/top1"], name, step_eval[f"{name}/loss"])
        writer.write_scalars(step, step_eval)
        eval_result = dict(step_eval, step=step)
      if save_due:
        ckpt.save(step, state, metrics=step_eval if val_split else None)
      if step_eval or save_due:
        window_start, window_time = step, time.time()
      if stopping and not is_last:
        logging.warning("Stopped by SIGTERM after step %d, checkpoint saved; run the same "
                        "command to resume.", step)
        eval_result = {"step": step, "stopped": True}
        break
  finally:
    # Let a step still running (an exception mid-loop) finish before step_fn is freed: with
    # dots on oneDNN (runtime.configure_xla_cpu) XLA aborts the process otherwise.
    with contextlib.suppress(Exception):
      jax.block_until_ready(state)
    writer.close()
    ckpt.close()
    stop.restore()
  return eval_result
