"""mixer.layer_norm: flax.linen.LayerNorm's parameters and numbers, the written-out backward."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer import layer_norm

EPS = 1e-6


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(0.5, 2.0, shape), jnp.float32)
  scale = jnp.asarray(rng.normal(1.0, 0.5, shape[-1:]), jnp.float32)
  bias = jnp.asarray(rng.normal(0.0, 0.5, shape[-1:]), jnp.float32)
  g = jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)
  return x, scale, bias, g


@pytest.mark.parametrize("shape", [(64, 16), (4, 8, 16)])
def test_module_matches_flax_layer_norm(shape):
  x, scale, bias, _ = _inputs(shape)
  ours = layer_norm.LayerNorm(epsilon=EPS)
  theirs = nn.LayerNorm(epsilon=EPS)
  ours_init = ours.init(jax.random.key(0), x)
  theirs_init = theirs.init(jax.random.key(0), x)
  assert jax.tree.structure(ours_init) == jax.tree.structure(theirs_init)
  assert jax.tree.all(jax.tree.map(np.array_equal, ours_init, theirs_init))
  params = {"params": {"scale": scale, "bias": bias}}
  expected = theirs.apply(params, x)
  np.testing.assert_allclose(ours.apply(params, x), expected, atol=2e-6, rtol=1e-5)
  # The form other backends use (autodiff) computes the same function.
  np.testing.assert_allclose(layer_norm.reference(x, scale, bias, EPS), expected, atol=2e-6,
                             rtol=1e-5)
  # Normalised rows: mean bias, spread scale.
  y = layer_norm.layer_norm(x, jnp.ones_like(scale), jnp.zeros_like(bias), EPS)
  np.testing.assert_allclose(jnp.mean(y, -1), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(y, -1), 1.0, atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 16), (4, 8, 16)])
def test_written_out_backward_matches_autodiff(shape):
  x, scale, bias, g = _inputs(shape, seed=1)

  def vjp(fn):
    _, pullback = jax.vjp(lambda x, s, b: fn(x, s, b, EPS), x, scale, bias)
    return pullback(g)

  ours, theirs = vjp(layer_norm.layer_norm), vjp(layer_norm.reference)
  for name, a, b in zip(("dx", "dscale", "dbias"), ours, theirs):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)
  # The x gradient of a LayerNorm is orthogonal to constant rows: it sums to zero per row.
  np.testing.assert_allclose(jnp.sum(ours[0], -1), 0.0, atol=1e-4)


def test_constant_rows_stay_finite():
  x = jnp.full((8, 16), 3.0)
  scale, bias = jnp.ones((16,)), jnp.full((16,), 0.25)
  y, pullback = jax.vjp(lambda x, s, b: layer_norm.layer_norm(x, s, b, EPS), x, scale, bias)
  np.testing.assert_allclose(y, 0.25)
  grads = pullback(jnp.ones_like(x))
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in grads)


def test_bfloat16_output_with_float32_statistics():
  x, scale, bias, _ = _inputs((32, 16), seed=2)
  params = {"params": {"scale": scale, "bias": bias}}
  ours = layer_norm.LayerNorm(epsilon=EPS, dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
  theirs = nn.LayerNorm(epsilon=EPS, dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                             atol=0.05, rtol=0.02)
