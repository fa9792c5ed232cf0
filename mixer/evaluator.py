"""Scoring a whole split: each example exactly once, in padded batches, on every device.

The test-time views of a batch go through the model together (predict_logits), on CPU in
cache-sized chunks of examples: the same logits as one model call per view, sooner.

Imports neither clu, ml_collections nor TensorFlow.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mixer import data, metrics, models, parallel


def shifted(images: jax.Array, dy: int, dx: int, fill: float = -1.0) -> jax.Array:
  """Each image moved down by `dy` and right by `dx` pixels (negative: up/left), the uncovered
  border filled with `fill` (-1.0: black, as the training crops pad)."""
  _, h, w, _ = images.shape
  p = max(abs(dy), abs(dx))
  padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=fill)
  return padded[:, p - dy:p - dy + h, p - dx:p - dx + w, :]


def test_time_views(shift: int) -> list[tuple[int, int]]:
  """(dy, dx) of each view: the image itself, then moved `shift` pixels up, down, left, right."""
  if shift == 0:
    return [(0, 0)]
  return [(0, 0), (-shift, 0), (shift, 0), (0, -shift), (0, shift)]


def describe_views(flip: bool, shift: int) -> str:
  """'flip test-time augmentation', '10-view test-time augmentation (2-pixel shifts, flips)', ''."""
  if not shift:
    return "flip test-time augmentation" if flip else ""
  views = len(test_time_views(shift)) * (2 if flip else 1)
  return (f"{views}-view test-time augmentation ({shift}-pixel shifts"
          f"{', flips' if flip else ''})")


# Rows (examples x views) per model application on CPU, where activations of ~64 rows stay
# in the core's cache: at the CPU-hour shape 1.2x (idle) to 1.6x (loaded) faster than one
# call per view on 500 examples, and than all 5,000 rows at once (benchmarks/eval_cost.py).
CPU_ROWS_PER_APPLY = 64


def stacked_views(images: jax.Array, flip: bool = False, shift: int = 0) -> jax.Array:
  """(batch * views, h, w, c): each example's test-time views next to each other (the order
  of test_time_views, then their mirrors), so a batch split over devices keeps every
  example's views on its device."""
  views = [shifted(images, dy, dx) if dy or dx else images for dy, dx in test_time_views(shift)]
  if flip:
    views += [v[:, :, ::-1, :] for v in views]
  return jnp.stack(views, axis=1).reshape((-1,) + images.shape[1:])


def num_views(flip: bool, shift: int) -> int:
  return len(test_time_views(shift)) * (2 if flip else 1)


def _mean_of_views(model: models.MlpMixer, params: Any, images: jax.Array, flip: bool,
                   shift: int) -> jax.Array:
  """One model application on all views of `images`; their float32 logits averaged."""
  views = num_views(flip, shift)
  logits = model.apply({"params": params}, stacked_views(images, flip, shift), train=False)
  logits = logits.astype(jnp.float32).reshape(images.shape[0], views, -1)
  total = logits[:, 0]
  for i in range(1, views):  # summed in view order, as one model call per view did
    total = total + logits[:, i]
  return total / views


def chunk_examples(per_device: int, views: int, rows: int | None) -> int:
  """Examples per device in each model application: the largest divisor of `per_device`
  whose views fit in `rows` (at least 1); all of them when `rows` is None."""
  if rows is None:
    return per_device
  fit = max(rows // views, 1)
  return max(k for k in range(1, min(fit, per_device) + 1) if per_device % k == 0)


def predict_logits(model: models.MlpMixer, params: Any, images: jax.Array,
                   flip: bool = False, shift: int = 0, rows_per_apply: int | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> jax.Array:
  """float32 logits of float images in [-1, 1], averaged over the test-time views: with `shift`,
  the image and its four copies moved `shift` pixels; with `flip`, each of those and its mirror.

  The views go through the model together, `rows_per_apply` (examples x views, per device)
  at a time in a loop, or all at once when None. With `mesh`, the batch axis of `images` is
  split over its devices and each device loops over its own examples.
  """
  devices = 1 if mesh is None else mesh.devices.size
  per_device = images.shape[0] // devices
  k = chunk_examples(per_device, num_views(flip, shift), rows_per_apply)
  if k == per_device:
    return _mean_of_views(model, params, images, flip, shift)
  # (devices * per_device, ...) -> (chunks, devices * k, ...): chunk i holds examples
  # [i*k, (i+1)*k) of every device's share, so the loop axis is not split over devices.
  chunks = per_device // k
  x = images.reshape((devices, chunks, k) + images.shape[1:]).swapaxes(0, 1)
  x = x.reshape((chunks, devices * k) + images.shape[1:])
  if mesh is not None:
    x = jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh, leading_dims=1))
  logits = jax.lax.map(lambda chunk: _mean_of_views(model, params, chunk, flip, shift), x)
  logits = logits.reshape(chunks, devices, k, -1).swapaxes(0, 1)
  return logits.reshape(images.shape[0], -1)


def default_rows_per_apply(mesh: jax.sharding.Mesh) -> int | None:
  """CPU_ROWS_PER_APPLY on CPU; on GPU/TPU the whole batch in one application."""
  return CPU_ROWS_PER_APPLY if mesh.devices.flat[0].platform == "cpu" else None


def make_eval_step(model: models.MlpMixer, image_size: int, batch_size: int,
                   mesh: jax.sharding.Mesh, flip: bool = False, shift: int = 0,
                   with_logits: bool = False, rows_per_apply: int | None = None) -> Callable:
  """(params, images, labels, mask, index) -> masked sums of loss/top1/top5/count, and first
  the batch's logits (sharded like the batch) when `with_logits`. `rows_per_apply`: as in
  predict_logits."""
  def eval_step(params, all_images, all_labels, all_mask, index):
    shard = lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh))
    images, labels, mask = map(shard, data.eval_batch(all_images, all_labels, all_mask, index,
                                                      batch_size))
    logits = predict_logits(model, params, data.to_float(images, image_size), flip, shift,
                            rows_per_apply, mesh)
    loss = metrics.cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
    top5 = metrics.topk_correct(logits, labels, min(5, logits.shape[-1]))
    sums = jnp.stack([jnp.sum(loss * mask), jnp.sum(metrics.topk_correct(logits, labels, 1) * mask),
                      jnp.sum(top5 * mask), jnp.sum(mask)])
    return (logits, sums) if with_logits else sums
  return eval_step


class Evaluator:
  """Evaluates params on a whole split, each example exactly once (padded batches + mask).

  The batch size is rounded up to a multiple of the device count. Metrics are named
  `{prefix}/loss`, `{prefix}/top1`, ...; `flip` and `shift` average the logits of test-time views (predict_logits).
  Only the metric sums are replicated; logits are computed where their examples are and
  leave the devices only when asked for (`keep_logits`). `rows_per_apply` (predict_logits):
  None picks default_rows_per_apply(mesh), 0 the whole batch at once.
  """

  def __init__(self, model: models.MlpMixer, split: data.Split, image_size: int, batch_size: int,
               mesh: jax.sharding.Mesh, flip: bool = False, shift: int = 0,
               prefix: str = "eval", rows_per_apply: int | None = None):
    self.prefix = prefix
    if rows_per_apply is None:
      rows_per_apply = default_rows_per_apply(mesh)
    self.rows_per_apply = rows_per_apply or None
    devices = mesh.devices.size
    batch_size = -(-batch_size // devices) * devices  # padding absorbs the rounding up
    images, labels, mask = data.pad_to_multiple(split, batch_size)
    self.arrays = [parallel.put_replicated(a, mesh) for a in (images, labels, mask)]
    self.num_batches = len(labels) // batch_size
    self.num_examples = len(split)
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    step = lambda with_logits: make_eval_step(model, image_size, batch_size, mesh, flip,
                                              shift, with_logits, self.rows_per_apply)
    self.step = jax.jit(step(False), out_shardings=replicated)
    self.step_with_logits = jax.jit(step(True), out_shardings=(sharded, replicated))

  def __call__(self, params: Any, keep_logits: bool = False) -> dict[str, Any]:
    sums, logits = 0.0, []
    for i in range(self.num_batches):
      if keep_logits:
        batch_logits, batch_sums = self.step_with_logits(params, *self.arrays, np.int32(i))
        logits.append(batch_logits)
      else:
        batch_sums = self.step(params, *self.arrays, np.int32(i))
      sums = sums + batch_sums
    loss, top1, top5, count = np.asarray(jax.device_get(sums), np.float64)
    p = self.prefix
    result = {f"{p}/loss": loss / count, f"{p}/top1": top1 / count, f"{p}/top5": top5 / count,
              f"{p}/num_examples": int(count)}
    if keep_logits:
      result["logits"] = np.concatenate([_to_host(x) for x in logits])[: self.num_examples]
    return result

  def seconds_per_call(self, params: Any, clock: Callable[[], float]) -> float:
    """What one call costs, from one batch timed after compiling (`clock` in seconds)."""
    run_batch = lambda: jax.block_until_ready(self.step(params, *self.arrays, np.int32(0)))
    run_batch()
    start = clock()
    run_batch()
    return (clock() - start) * self.num_batches


def _to_host(array: jax.Array) -> np.ndarray:
  """The whole (batch-sharded) array on this host, from every process when there are several."""
  if array.is_fully_addressable:
    return np.asarray(jax.device_get(array))
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))
