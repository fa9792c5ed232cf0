"""The Mixer model: published parameter counts and tree, shapes, dtypes, options, errors."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixer
from mixer import models


@pytest.mark.parametrize("variant,expected", [
    ("B/16", 59_880_472), ("B/32", 60_293_428), ("L/16", 208_196_168)])
def test_published_parameter_counts(variant, expected):
  assert mixer.count_params(mixer.create_model(variant, 1000), 224) == expected


def test_parameter_tree_matches_published_checkpoints():
  model = mixer.create_model("B/16", 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  paths = {"/".join(k) for k in flax.traverse_util.flatten_dict(shapes["params"])}
  expected = {"stem/kernel", "stem/bias", "pre_head_layer_norm/scale",
              "pre_head_layer_norm/bias", "head/kernel", "head/bias"}
  for i in range(12):
    for sub in ("LayerNorm_0", "LayerNorm_1"):
      expected |= {f"MixerBlock_{i}/{sub}/scale", f"MixerBlock_{i}/{sub}/bias"}
    for mlp in ("token_mixing", "channel_mixing"):
      for dense in ("Dense_0", "Dense_1"):
        expected |= {f"MixerBlock_{i}/{mlp}/{dense}/kernel", f"MixerBlock_{i}/{mlp}/{dense}/bias"}
  assert paths == expected
  flat = flax.traverse_util.flatten_dict(shapes["params"], sep="/")
  assert flat["stem/kernel"].shape == (16, 16, 3, 768)
  assert flat["MixerBlock_0/token_mixing/Dense_0/kernel"].shape == (196, 384)
  assert flat["MixerBlock_0/channel_mixing/Dense_0/kernel"].shape == (768, 3072)
  assert flat["head/kernel"].shape == (768, 1000)


def _tiny(**kw):
  return mixer.create_model("Ti/4", 10, hidden_dim=16, num_blocks=3, tokens_mlp_dim=8,
                            channels_mlp_dim=32, **kw)


def test_output_shapes_and_zero_head():
  model = _tiny()
  x = jnp.ones((2, 32, 32, 3))
  params = model.init(jax.random.key(0), x)["params"]
  assert model.apply({"params": params}, x).shape == (2, 10)
  np.testing.assert_array_equal(params["head"]["kernel"], 0)
  features = mixer.create_model("Ti/4", 0, hidden_dim=16, num_blocks=1)
  fp = features.init(jax.random.key(0), x)["params"]
  assert "head" not in fp
  assert features.apply({"params": fp}, x).shape == (2, 16)


def test_overrides_win_over_variant_defaults():
  model = mixer.create_model("S/16", 7, hidden_dim=64, num_blocks=2)
  assert (model.hidden_dim, model.num_blocks, model.tokens_mlp_dim, model.patch_size) == (64, 2, 256, 16)


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype="bfloat16")
  x = jnp.ones((2, 32, 32, 3))
  params = model.init(jax.random.key(0), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  features = mixer.create_model("Ti/4", 0, hidden_dim=16, num_blocks=2, dtype=jnp.bfloat16)
  out, inter = features.apply({"params": features.init(jax.random.key(0), x)["params"]}, x,
                              capture_intermediates=True, mutable=["intermediates"])
  assert out.dtype == jnp.bfloat16
  block_out = inter["intermediates"]["MixerBlock_0"]["__call__"][0]
  assert block_out.dtype == jnp.bfloat16
  assert model.apply({"params": params}, x).dtype == jnp.bfloat16


def test_stochastic_depth_identity_at_eval_random_in_training():
  model = _tiny(stoch_depth=0.5)
  plain = _tiny()
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  params = plain.init(jax.random.key(0), x)["params"]
  params["head"]["kernel"] = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)
  ref = plain.apply({"params": params}, x)
  np.testing.assert_allclose(model.apply({"params": params}, x), ref, rtol=1e-6, atol=1e-6)
  train = lambda seed: model.apply({"params": params}, x, train=True,
                                   rngs={"dropout": jax.random.key(seed)})
  a, b = train(0), train(1)
  assert not np.allclose(a, b), "different rngs must drop different blocks"
  np.testing.assert_array_equal(a, train(0))
  # One decision per example: eight copies of one image, in one batch, do not all agree (a
  # decision per batch would drop the same blocks for all of them).
  copies = jnp.repeat(x[:1], 8, axis=0)
  out = np.asarray(model.apply({"params": params}, copies, train=True,
                               rngs={"dropout": jax.random.key(0)}))
  distinct = {tuple(np.round(row, 4)) for row in out}
  assert len(distinct) > 1


def test_stochastic_depth_rate_rises_linearly_from_zero():
  """Block i gets rate stoch_depth * i / (blocks - 1), as the model wires it."""
  np.testing.assert_allclose(mixer.models.drop_path_rates(0.4, 5), [0.0, 0.1, 0.2, 0.3, 0.4])
  assert mixer.models.drop_path_rates(0.3, 1) == [0.0]
  model = mixer.create_model("Ti/4", 0, hidden_dim=16, num_blocks=5, stoch_depth=0.4)
  x = jnp.zeros((2, 8, 8, 3))
  params = model.init(jax.random.key(0), x)["params"]
  seen = {}

  def record(next_fn, args, kwargs, context):
    if isinstance(context.module, mixer.models.MixerBlock) and context.method_name == "__call__":
      seen[context.module.name] = context.module.drop_path
    return next_fn(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_allclose([seen[f"MixerBlock_{i}"] for i in range(5)],
                             [0.0, 0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_a_blocks_drop_path_skips_that_fraction_of_examples(rate):
  """A dropped example leaves the block unchanged (both residual branches skipped)."""
  block = mixer.models.MixerBlock(8, 16, drop_path=rate)
  x = jax.random.normal(jax.random.key(0), (4000, 4, 8))
  params = block.init(jax.random.key(1), x, train=False)["params"]
  y = block.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
  unchanged = np.all(np.isclose(np.asarray(y), np.asarray(x)), axis=(1, 2))
  # Each branch is dropped independently: an example is left unchanged with probability r^2.
  assert abs(unchanged.mean() - rate ** 2) < 0.03


def test_indivisible_image_size_is_a_clear_error():
  model = _tiny()
  with pytest.raises(ValueError, match="not divisible by the patch size 4"):
    model.init(jax.random.key(0), jnp.ones((1, 30, 30, 3)))


@pytest.mark.parametrize("name", ["Q/16", "B16", "B/x", "B/0", ""])
def test_unknown_variant_is_a_clear_error(name):
  with pytest.raises(ValueError, match="Unknown Mixer variant"):
    mixer.create_model(name, 10)


def test_unknown_override_is_a_clear_error():
  with pytest.raises(TypeError, match="hidden_size"):
    mixer.create_model("S/16", 10, hidden_size=3)


def test_both_token_mixing_forms_hold_the_same_parameters_and_compute_the_same_function():
  """'batched' (TokenDense, for CPU) and 'transpose' (the official form, for GPU/TPU): same
  tree and initial values, same logits, same gradients of the parameters and the input."""
  make = lambda form: mixer.create_model("Ti/4", 10, hidden_dim=24, num_blocks=2,
                                         tokens_mlp_dim=40, channels_mlp_dim=32,
                                         token_mixing=form)
  batched, transpose = make("batched"), make("transpose")
  assert (batched.token_mixing, transpose.token_mixing) == ("batched", "transpose")
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  params = batched.init(jax.random.key(1), x)["params"]
  ref_params = transpose.init(jax.random.key(1), x)["params"]
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)
  # Perturbed (the head starts at zero, biases too) so that every gradient is non-trivial.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  loss = lambda model: lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
  np.testing.assert_allclose(batched.apply({"params": params}, x),
                             transpose.apply({"params": params}, x), rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(batched), argnums=(0, 1))(params, x)
  want = jax.grad(loss(transpose), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert float(jnp.max(jnp.abs(b))) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, platform, expected", [
    ("auto", "cpu", "batched"), ("auto", "gpu", "transpose"), ("auto", "tpu", "transpose"),
    ("transpose", "cpu", "transpose"), ("batched", "gpu", "batched")])
def test_token_mixing_auto_is_batched_on_cpu_only(name, platform, expected):
  assert models.resolve_token_mixing(name, platform) == expected


def test_unknown_token_mixing_is_refused():
  with pytest.raises(ValueError, match="Unknown token_mixing 'einsum'"):
    mixer.create_model("Ti/4", 10, token_mixing="einsum")


@pytest.mark.parametrize("name, platform, expected", [
    ("auto", "cpu", "float32"), ("auto", "gpu", "bfloat16"), ("auto", "tpu", "bfloat16"),
    ("bfloat16", "cpu", "bfloat16"), ("float32", "tpu", "float32")])
def test_auto_compute_dtype_is_bfloat16_on_accelerators_only(name, platform, expected):
  assert models.resolve_dtype(name, platform) == expected
