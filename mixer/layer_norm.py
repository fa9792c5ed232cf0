"""LayerNorm over the last axis: flax.linen.LayerNorm's parameters and numbers, faster on CPU.

Parameters `scale` (ones) and `bias` (zeros) of shape (features,), as flax's LayerNorm and the
published checkpoints hold them; the statistics are flax's (mean and mean of squares, float32
at least). On XLA:CPU the row statistics are matrix-vector products and the backward pass is
written out (`layer_norm`); elsewhere the same formula is left to autodiff (`reference`).

Why on CPU (jaxlib 0.10, Mixer-Ti/4 train step, docs/BENCHMARKS.md): XLA:CPU gives flax's
reductions to YNNPACK fusions, which take their operands materialised, so the scale and the
per-row 1/std were broadcast to full (batch*tokens, channels) arrays before being reduced (a
4 MB write each, ~1.4 ms); LayerNorm was 23% of the step against PyTorch's fused kernel. As
dots against a vector (oneDNN) and with the backward's row sums as `g @ scale`, nothing is
broadcast and the step ran 507 -> 533 img/s.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST  # the statistics' dots stay float32 on every backend


def _row_mean(x: jax.Array, v: jax.Array) -> jax.Array:
  """(x @ v)[..., None]: x's rows against the vector v, as one matrix-vector product."""
  return jnp.matmul(x, v, precision=_HIGHEST)[..., None]


def _normalize(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """(x - mean) / std over the last axis, and 1/std (keepdims), flax's fast variance."""
  n = x.shape[-1]
  ones = jnp.full((n,), 1.0 / n, x.dtype)
  mean = _row_mean(x, ones)
  var = jnp.maximum(_row_mean(x * x, ones) - mean * mean, 0.0)
  inv_std = jax.lax.rsqrt(var + epsilon)
  return (x - mean) * inv_std, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """LayerNorm of x's last axis with the backward pass written out (float32 in and out)."""
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  normed, inv_std = _normalize(x, epsilon)
  return normed * scale + bias, (normed, inv_std, scale)


def _backward(epsilon, residuals, g):
  del epsilon
  normed, inv_std, scale = residuals
  n = g.shape[-1]
  g_normed = g * normed
  # dx = (g*scale - mean(g*scale) - normed * mean(g*scale*normed)) / std, row means as dots.
  mean_g = _row_mean(g, scale / n)
  mean_g_normed = _row_mean(g_normed, scale / n)
  dx = inv_std * (g * scale - mean_g - normed * mean_g_normed)
  rows = tuple(range(g.ndim - 1))
  return dx, jnp.sum(g_normed, rows), jnp.sum(g, rows)


layer_norm.defvjp(_forward, _backward)


def reference(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """flax.linen.LayerNorm's computation (fast variance), differentiated by JAX."""
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.maximum(jnp.mean(x * x, -1, keepdims=True) - mean * mean, 0.0)
  return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


class LayerNorm(nn.Module):
  """flax.linen.LayerNorm(epsilon, dtype, param_dtype) over the last axis, same parameters."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    # Statistics in float32 at least, as flax computes them; the output in self.dtype.
    compute = jnp.promote_types(jnp.promote_types(x.dtype, self.param_dtype), jnp.float32)
    fn = layer_norm if jax.default_backend() == "cpu" else reference
    y = fn(x.astype(compute), scale.astype(compute), bias.astype(compute), self.epsilon)
    return y.astype(self.dtype)
