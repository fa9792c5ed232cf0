"""Scoring a whole split: each example exactly once, in padded batches, on every device.

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


def predict_logits(model: models.MlpMixer, params: Any, images: jax.Array,
                   flip: bool = False, shift: int = 0) -> jax.Array:
  """float32 logits of float images in [-1, 1], averaged over the test-time views: with `shift`,
  the image and its four copies moved `shift` pixels; with `flip`, each of those and its mirror."""
  views = [shifted(images, dy, dx) for dy, dx in test_time_views(shift)]
  if flip:
    views += [v[:, :, ::-1, :] for v in views]
  logits = [model.apply({"params": params}, v, train=False).astype(jnp.float32) for v in views]
  return sum(logits[1:], logits[0]) / len(logits)


def make_eval_step(model: models.MlpMixer, image_size: int, batch_size: int,
                   mesh: jax.sharding.Mesh, flip: bool = False, shift: int = 0,
                   with_logits: bool = False) -> Callable:
  """(params, images, labels, mask, index) -> masked sums of loss/top1/top5/count, and first
  the batch's logits (sharded like the batch) when `with_logits`."""
  def eval_step(params, all_images, all_labels, all_mask, index):
    shard = lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh))
    images, labels, mask = map(shard, data.eval_batch(all_images, all_labels, all_mask, index,
                                                      batch_size))
    logits = predict_logits(model, params, data.to_float(images, image_size), flip, shift)
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
  leave the devices only when asked for (`keep_logits`).
  """

  def __init__(self, model: models.MlpMixer, split: data.Split, image_size: int, batch_size: int,
               mesh: jax.sharding.Mesh, flip: bool = False, shift: int = 0,
               prefix: str = "eval"):
    self.prefix = prefix
    devices = mesh.devices.size
    batch_size = -(-batch_size // devices) * devices  # padding absorbs the rounding up
    images, labels, mask = data.pad_to_multiple(split, batch_size)
    self.arrays = [parallel.put_replicated(a, mesh) for a in (images, labels, mask)]
    self.num_batches = len(labels) // batch_size
    self.num_examples = len(split)
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    step = lambda with_logits: make_eval_step(model, image_size, batch_size, mesh, flip,
                                              shift, with_logits)
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
