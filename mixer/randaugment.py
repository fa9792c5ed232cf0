"""RandAugment and random erasing on the device, batched over examples with vmap.

RandAugment (Cubuk et al. 2019) applies `num_ops` ops to each image, each drawn uniformly
from the 14 ops of the paper (and torchvision): identity, auto_contrast, equalize, rotate,
solarize, color, posterize, contrast, brightness, sharpness, shear_x, shear_y, translate_x,
translate_y. Magnitudes are on the 0..10 scale with timm's "increasing" conventions, under
which magnitude 0 is the identity for every op that has a magnitude:

  rotate       30 * m/10 degrees, random sign (counter-clockwise for m > 0)
  shear_x/y    shear factor 0.3 * m/10, random sign, about the top-left corner (as PIL/timm)
  translate    0.45 * m/10 of the image size, random sign (timm's translate_pct)
  solarize     invert pixels >= 256 - 256 * m/10
  posterize    keep 8 - int(4 * m/10) bits (8 at m=0, 4 at m=10)
  color, contrast, brightness, sharpness
               blend factor 1 + 0.9 * m/10, random sign (factor in [0.1, 1.9]); the PIL
               ImageEnhance definitions: blend with grayscale / mean gray / black / smoothed
  auto_contrast, equalize  have no magnitude (PIL ImageOps semantics, per channel).

Unlike timm, every drawn op is applied (no extra probability 0.5); identity is in the set.
Geometric ops sample bilinearly and fill outside the image with gray 128 (timm's fill).
Images are rounded to integers and clipped to [0, 255] after every op, as the uint8 PIL
ops are. The ops of the `OPS` table take one float (H, W, C) image with values in
[0, 255] and a signed magnitude (the sign picks the direction of the signed ops).
"""
from __future__ import annotations

import math
from typing import Callable

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

FILL = 128.0
_ERASE_AREA = (0.02, 1 / 3)  # fraction of the image, as Zhong et al. and timm
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
_ERASE_ATTEMPTS = 10

Op = Callable[[jax.Array, jax.Array], jax.Array]
_LEVELS = np.arange(256, dtype=np.float32)  # numpy: importing must not start JAX


# Every op is one of three primitives, so that rand_augment, which under vmap must compute
# every op for every image, computes one of each with per-image parameters instead of 14:
# a per-channel lookup table, a PIL ImageEnhance blend, or an affine warp.

# Lookup-table ops: (image, m) -> (C, 256) table of output values per channel.
def _auto_contrast_lut(image: jax.Array, m: jax.Array) -> jax.Array:
  del m
  lo, hi = image.min(axis=(0, 1))[:, None], image.max(axis=(0, 1))[:, None]
  stretched = (_LEVELS - lo) * (255.0 / jnp.maximum(hi - lo, 1.0))
  return jnp.where(hi > lo, stretched, _LEVELS)


def _equalize_lut(image: jax.Array, m: jax.Array) -> jax.Array:
  """PIL's ImageOps.equalize: v -> (step // 2 + #pixels below v) // step per channel, with
  step = (#pixels - #pixels at the channel's maximum) // 255; identity if step is 0."""
  del m
  h, w, c = image.shape
  values = image.astype(jnp.int32).reshape(h * w, c)
  hist = jnp.zeros((256, c), jnp.int32).at[values, jnp.arange(c)].add(1)
  step = (h * w - hist[values.max(axis=0), jnp.arange(c)]) // 255
  lut = (step // 2 + jnp.cumsum(hist, axis=0) - hist) // jnp.maximum(step, 1)
  return jnp.where(step > 0, jnp.minimum(lut, 255), _LEVELS[:, None]).T.astype(jnp.float32)


def _solarize_lut(image: jax.Array, m: jax.Array) -> jax.Array:
  threshold = 256.0 - 25.6 * jnp.abs(m)
  lut = 255.0 * dm_pix.solarize(_LEVELS / 255.0, threshold / 255.0)
  return jnp.broadcast_to(lut, (image.shape[-1], 256))


def _posterize_lut(image: jax.Array, m: jax.Array) -> jax.Array:
  shift = jnp.clip(jnp.floor(0.4 * jnp.abs(m)), 0, 8).astype(jnp.int32)
  lut = ((jnp.arange(256) >> shift) << shift).astype(jnp.float32)
  return jnp.broadcast_to(lut, (image.shape[-1], 256))


def _identity_lut(image: jax.Array, m: jax.Array) -> jax.Array:
  del m
  return jnp.broadcast_to(_LEVELS, (image.shape[-1], 256))


_LUTS: dict[str, Op] = {"identity": _identity_lut, "auto_contrast": _auto_contrast_lut,
                        "equalize": _equalize_lut, "solarize": _solarize_lut,
                        "posterize": _posterize_lut}


def _apply_lut(image: jax.Array, lut: jax.Array) -> jax.Array:
  h, w, c = image.shape
  values = image.astype(jnp.int32).reshape(h * w, c)
  return jnp.take_along_axis(lut.T, values, axis=0).reshape(h, w, c)


# Enhance ops: PIL's degenerate image, blended with the image by factor 1 + 0.09 m.
def _smooth(image: jax.Array) -> jax.Array:
  """PIL's SMOOTH filter (3x3, centre weight 5, total 13) inside; border pixels kept."""
  h, w = image.shape[:2]
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
  smooth = (sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
            + 4.0 * image) / 13.0
  interior = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
  return jnp.where(interior, smooth, image)


_DEGENERATE: dict[str, Callable[[jax.Array], jax.Array]] = {
    "color": lambda image: jnp.broadcast_to(dm_pix.rgb_to_grayscale(image), image.shape),
    "contrast": lambda image: jnp.full_like(image, jnp.mean(dm_pix.rgb_to_grayscale(image))),
    "brightness": jnp.zeros_like,
    "sharpness": _smooth,
}


def _blend(image: jax.Array, degenerate: jax.Array, m: jax.Array) -> jax.Array:
  return degenerate + (1.0 + 0.09 * m) * (image - degenerate)


# Geometric ops: 3x3 "pull" matrices in homogeneous (row, col) coordinates, mapping an
# output pixel to the input position it samples.
def _rotate_matrix(degrees: jax.Array, h: int, w: int) -> jax.Array:
  t = jnp.deg2rad(degrees)
  c, s = jnp.cos(t), jnp.sin(t)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  return jnp.array([[c, s, cy - c * cy - s * cx], [-s, c, cx + s * cy - c * cx], [0, 0, 1]])


_GEOMETRIC: dict[str, Callable[[jax.Array, int, int], jax.Array]] = {
    "rotate": lambda m, h, w: _rotate_matrix(3.0 * m, h, w),
    "shear_x": lambda m, h, w: jnp.array([[1, 0, 0], [0.03 * m, 1, 0], [0, 0, 1]]),
    "shear_y": lambda m, h, w: jnp.array([[1, 0.03 * m, 0], [0, 1, 0], [0, 0, 1]]),
    "translate_x": lambda m, h, w: jnp.array([[1, 0, 0], [0, 1, 0.045 * m * w], [0, 0, 1]]),
    "translate_y": lambda m, h, w: jnp.array([[1, 0, 0.045 * m * h], [0, 1, 0], [0, 0, 1]]),
}


def _warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
  """Samples `image` (H, W, C) bilinearly at matrix @ (row, col, 1) per output pixel.

  Not dm_pix.affine_transform: that interpolates over the channel axis too (8 corners, not
  4) and fills a pixel with gray as soon as any corner is outside; it made a batch of 128
  cost ~50 ms per op on 2 CPU cores. Here each corner outside the image counts as gray.
  """
  h, w, c = image.shape
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                            jnp.arange(w, dtype=jnp.float32), indexing="ij")
  y = matrix[0, 0] * rows + matrix[0, 1] * cols + matrix[0, 2]
  x = matrix[1, 0] * rows + matrix[1, 1] * cols + matrix[1, 2]
  y0, x0 = jnp.floor(y), jnp.floor(x)
  flat = image.reshape(h * w, c)
  out = jnp.zeros_like(image)
  for yi, xi in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
    inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    index = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
    weight = (1 - jnp.abs(y - yi)) * (1 - jnp.abs(x - xi))
    out = out + weight[..., None] * jnp.where(inside[..., None], flat[index], FILL)
  return out


def rotate(image: jax.Array, degrees: float | jax.Array) -> jax.Array:
  """Rotates a float (H, W, C) image counter-clockwise about its centre; gray fill."""
  return _warp(image, _rotate_matrix(jnp.asarray(degrees, jnp.float32), *image.shape[:2]))


def _quantize(image: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round(image), 0.0, 255.0)


def _op(name: str) -> Op:
  if name in _LUTS:
    return lambda image, m: _quantize(_apply_lut(image, _LUTS[name](image, m)))
  if name in _DEGENERATE:
    return lambda image, m: _quantize(_blend(image, _DEGENERATE[name](image), m))
  return lambda image, m: _quantize(_warp(image, _GEOMETRIC[name](m, *image.shape[:2])))


OP_NAMES = ("identity", "auto_contrast", "equalize", "rotate", "solarize", "color",
            "posterize", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
            "translate_x", "translate_y")
OPS: dict[str, Op] = {name: _op(name) for name in OP_NAMES}


def _select(op: jax.Array, values: dict[str, jax.Array], default: jax.Array) -> jax.Array:
  """values[OP_NAMES[op]], or `default` for the ops not in `values`."""
  index = jnp.array([1 + list(values).index(n) if n in values else 0 for n in OP_NAMES])
  return jnp.stack([default, *values.values()])[index[op]]


def _apply_op(image: jax.Array, op: jax.Array, m: jax.Array) -> jax.Array:
  """Applies op number `op` of OP_NAMES as table, then blend, then warp, giving the two of
  these that the op does not use identity parameters."""
  h, w, _ = image.shape
  lut = _select(op, {n: f(image, m) for n, f in _LUTS.items()}, _identity_lut(image, m))
  degenerate = _select(op, {n: f(image) for n, f in _DEGENERATE.items()}, image)
  blend_m = _select(op, {n: m for n in _DEGENERATE}, jnp.zeros_like(m))
  matrix = _select(op, {n: f(m, h, w) for n, f in _GEOMETRIC.items()}, jnp.eye(3))
  return _quantize(_warp(_blend(_apply_lut(image, lut), degenerate, blend_m), matrix))


def rand_augment(key: jax.Array, images: jax.Array, num_ops: int, magnitude: float) -> jax.Array:
  """RandAugment of uint8 images (N, H, W, C): `num_ops` random ops per image at
  `magnitude` (0..10) with a random sign per op; returns uint8 of the same shape.

  `num_ops` is a Python int (static under jit); `magnitude` may be traced.
  """
  if num_ops == 0:
    return images
  n = images.shape[0]
  x = images.astype(jnp.float32)
  for k in jax.random.split(key, num_ops):
    k_op, k_sign = jax.random.split(k)
    ops = jax.random.randint(k_op, (n,), 0, len(OP_NAMES))
    signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (n,)), 1.0, -1.0)
    x = jax.vmap(_apply_op)(x, ops, signs * magnitude)
  return x.astype(jnp.uint8)


def random_erasing(key: jax.Array, images: jax.Array, probability: float) -> jax.Array:
  """Random erasing (Zhong et al. 2017; timm's "pixel" mode) of float images (N, H, W, C).

  With `probability`, an image gets one box of 2%..33% of its area, aspect ratio
  log-uniform in [0.3, 3.3], filled with standard normal noise per pixel and channel.
  As in timm, up to 10 boxes are drawn and the first that fits is used (none: no erasing);
  a box must also keep its area fraction within the bounds after rounding to pixels.
  `probability` is a Python float (static under jit).
  """
  if probability <= 0:
    return images
  n, h, w, _ = images.shape
  k_apply, k_area, k_aspect, k_y, k_x, k_noise = jax.random.split(key, 6)
  shape = (n, _ERASE_ATTEMPTS)
  area = jax.random.uniform(k_area, shape, minval=_ERASE_AREA[0], maxval=_ERASE_AREA[1]) * h * w
  aspect = jnp.exp(jax.random.uniform(k_aspect, shape, minval=_ERASE_LOG_ASPECT[0],
                                      maxval=_ERASE_LOG_ASPECT[1]))
  box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fraction = box_h * box_w / (h * w)
  fits = ((box_h < h) & (box_w < w) & (fraction >= _ERASE_AREA[0])
          & (fraction <= _ERASE_AREA[1]))
  first = jnp.argmax(fits, axis=1)[:, None]
  box_h = jnp.take_along_axis(box_h, first, axis=1)  # (n, 1)
  box_w = jnp.take_along_axis(box_w, first, axis=1)
  top = jnp.floor(jax.random.uniform(k_y, (n, 1)) * (h - box_h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_x, (n, 1)) * (w - box_w + 1)).astype(jnp.int32)
  rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
  in_rows = (rows >= top) & (rows < top + box_h)  # (n, h)
  in_cols = (cols >= left) & (cols < left + box_w)  # (n, w)
  erase = jax.random.bernoulli(k_apply, probability, (n,)) & fits.any(axis=1)
  inside = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return jnp.where(inside[..., None], noise, images)
