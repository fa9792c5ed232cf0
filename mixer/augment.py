"""On-device augmentation, run inside the jitted train step and keyed by (seed, step).

Random crop with zero padding and horizontal flip on uint8 images; mixup and cutmix on
float images and their soft targets.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop_flip(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
  """Per example: pad by `padding` pixels, crop back to the original size, flip half."""
  n, h, w, c = images.shape
  k_y, k_x, k_flip = jax.random.split(key, 3)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ys = jax.random.randint(k_y, (n,), 0, 2 * padding + 1)
  xs = jax.random.randint(k_x, (n,), 0, 2 * padding + 1)
  crop = lambda img, y, x: jax.lax.dynamic_slice(img, (y, x, 0), (h, w, c))
  images = jax.vmap(crop)(padded, ys, xs)
  flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def soft_targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  """One-hot targets with label smoothing, float32."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes


def _box_mask(key: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """A random box covering about 1-lam of the image; returns (mask HxW, exact lam)."""
  k_y, k_x = jax.random.split(key)
  cut = jnp.sqrt(1.0 - lam)
  box_h, box_w = jnp.round(cut * height), jnp.round(cut * width)
  cy = jax.random.uniform(k_y, (), minval=0, maxval=height)
  cx = jax.random.uniform(k_x, (), minval=0, maxval=width)
  y0, y1 = jnp.clip(cy - box_h / 2, 0, height), jnp.clip(cy + box_h / 2, 0, height)
  x0, x1 = jnp.clip(cx - box_w / 2, 0, width), jnp.clip(cx + box_w / 2, 0, width)
  ys = jnp.arange(height)[:, None] + 0.5
  xs = jnp.arange(width)[None, :] + 0.5
  inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return inside, 1.0 - jnp.mean(inside.astype(jnp.float32))


def mixup_cutmix(key: jax.Array, images: jax.Array, targets: jax.Array, mixup_alpha: float,
                 cutmix_alpha: float) -> tuple[jax.Array, jax.Array]:
  """Mixes each example with its neighbour in the batch (one lam per batch).

  With both alphas > 0, each step picks mixup or cutmix with equal probability.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_choice, k_mix, k_cut, k_box = jax.random.split(key, 4)
  partner_images, partner_targets = jnp.roll(images, 1, axis=0), jnp.roll(targets, 1, axis=0)

  def mixup():
    lam = jax.random.beta(k_mix, mixup_alpha, mixup_alpha)
    return lam * images + (1 - lam) * partner_images, lam

  def cutmix():
    lam = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
    inside, lam = _box_mask(k_box, lam, images.shape[1], images.shape[2])
    return jnp.where(inside[None, :, :, None], partner_images, images), lam

  if mixup_alpha > 0 and cutmix_alpha > 0:
    mixed, lam = jax.lax.cond(jax.random.bernoulli(k_choice), mixup, cutmix)
  else:
    mixed, lam = mixup() if mixup_alpha > 0 else cutmix()
  return mixed.astype(images.dtype), lam * targets + (1 - lam) * partner_targets
