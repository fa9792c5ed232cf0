"""Published-layout .npz checkpoints: export/load round trip, head replacement, errors, and
the block-diagonal token-mixing adaptation for fine-tuning at a higher resolution."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixer
from mixer import pretrained

DIMS = dict(hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32)
PATCH, LOW_RES = 4, 16  # 4x4 = 16 tokens at pretraining resolution.


def _model(num_classes=10, **overrides):
  return mixer.create_model(f"Ti/{PATCH}", num_classes, **{**DIMS, **overrides})


def _init(model, image_size):
  return model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))["params"]


def _abstract(model, image_size):
  return jax.eval_shape(lambda: _init(model, image_size))


def _published_keys(num_blocks, head=True):
  keys = {"stem/kernel", "stem/bias", "pre_head_layer_norm/scale", "pre_head_layer_norm/bias"}
  if head:
    keys |= {"head/kernel", "head/bias"}
  for i in range(num_blocks):
    for norm in ("LayerNorm_0", "LayerNorm_1"):
      keys |= {f"MixerBlock_{i}/{norm}/{p}" for p in ("scale", "bias")}
    for mlp in ("token_mixing", "channel_mixing"):
      for dense in ("Dense_0", "Dense_1"):
        keys |= {f"MixerBlock_{i}/{mlp}/{dense}/{p}" for p in ("kernel", "bias")}
  return keys


@pytest.fixture(scope="module")
def pretrained_params():
  """Random params for every leaf (non-zero head, LayerNorms away from identity)."""
  params = _init(_model(), LOW_RES)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  return jax.tree.unflatten(
      treedef, [rng.normal(0, 0.5, x.shape).astype(np.float32) for x in leaves])


@pytest.fixture(scope="module")
def ckpt(pretrained_params, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt") / "Mixer-Ti_4.npz")
  pretrained.export_npz(pretrained_params, path)
  return path


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.key(1), (3, LOW_RES, LOW_RES, 3))


def test_export_writes_the_published_layout(ckpt, pretrained_params):
  flat = pretrained.load_npz(ckpt)
  assert set(flat) == _published_keys(DIMS["num_blocks"])
  assert all(v.dtype == np.float32 for v in flat.values())
  assert flat["MixerBlock_1/token_mixing/Dense_0/kernel"].shape == (16, 8)
  np.testing.assert_array_equal(flat["head/kernel"], pretrained_params["head"]["kernel"])
  # Atomic write: no temporary file is left next to the checkpoint.
  assert os.listdir(os.path.dirname(ckpt)) == [os.path.basename(ckpt)]


def test_export_casts_bfloat16_to_float32(tmp_path):
  params = {"stem": {"kernel": jnp.ones((2, 2), jnp.bfloat16)}}
  pretrained.export_npz(params, str(tmp_path / "x.npz"))
  flat = pretrained.load_npz(str(tmp_path / "x.npz"))
  assert list(flat) == ["stem/kernel"] and flat["stem/kernel"].dtype == np.float32


@pytest.mark.parametrize("abstract", [False, True])
def test_round_trip_gives_identical_logits(ckpt, pretrained_params, images, abstract):
  model = _model()
  template = _abstract(model, LOW_RES) if abstract else _init(model, LOW_RES)
  loaded = pretrained.load_pretrained(ckpt, template, num_tokens=16)
  assert jax.tree.structure(loaded) == jax.tree.structure(pretrained_params)
  jax.tree.map(np.testing.assert_array_equal, loaded, pretrained_params)
  np.testing.assert_array_equal(model.apply({"params": loaded}, images),
                                model.apply({"params": pretrained_params}, images))


def test_values_take_the_template_dtype(ckpt):
  template = _abstract(_model(param_dtype=jnp.bfloat16), LOW_RES)
  loaded = pretrained.load_pretrained(ckpt, template)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded))


@pytest.mark.parametrize("abstract", [False, True])
def test_new_class_count_gets_the_zero_head(ckpt, pretrained_params, abstract):
  model = _model(num_classes=7)
  template = _abstract(model, LOW_RES) if abstract else _init(model, LOW_RES)
  loaded = pretrained.load_pretrained(pretrained.load_npz(ckpt), template)
  assert loaded["head"]["kernel"].shape == (16, 7) and loaded["head"]["bias"].shape == (7,)
  np.testing.assert_array_equal(loaded["head"]["kernel"], 0)
  np.testing.assert_array_equal(loaded["head"]["bias"], 0)
  body = lambda p: {k: v for k, v in p.items() if k != "head"}
  jax.tree.map(np.testing.assert_array_equal, body(loaded), body(pretrained_params))


def test_featurizer_template_drops_the_head(ckpt, pretrained_params, images):
  model = _model(num_classes=0)
  loaded = pretrained.load_pretrained(ckpt, _init(model, LOW_RES))
  assert "head" not in loaded
  features = model.apply({"params": loaded}, images)
  # The pretrained head applied to these features gives the pretrained logits.
  head = pretrained_params["head"]
  np.testing.assert_allclose(features @ head["kernel"] + head["bias"],
                             _model().apply({"params": pretrained_params}, images),
                             rtol=1e-5, atol=1e-5)


def test_every_problem_is_listed_in_one_error(ckpt):
  flat = pretrained.load_npz(ckpt)
  del flat["MixerBlock_0/LayerNorm_1/scale"]
  flat["MixerBlock_9/extra/kernel"] = np.zeros(3, np.float32)
  flat["stem/bias"] = np.zeros(5, np.float32)
  flat["MixerBlock_1/channel_mixing/Dense_1/kernel"] = np.zeros((32, 4), np.float32)
  with pytest.raises(ValueError) as info:
    pretrained.load_pretrained(flat, _init(_model(), LOW_RES))
  message = str(info.value)
  assert "4 problem(s)" in message
  assert "missing from the checkpoint: MixerBlock_0/LayerNorm_1/scale" in message
  assert "in the checkpoint but not in the model: MixerBlock_9/extra/kernel" in message
  assert "stem/bias: checkpoint (5,), model (16,)" in message
  assert "MixerBlock_1/channel_mixing/Dense_1/kernel: checkpoint (32, 4), model (32, 16)" in message


def test_mismatched_head_hidden_dim_is_reported_through_the_body(ckpt):
  with pytest.raises(ValueError, match=r"stem/kernel: checkpoint \(4, 4, 3, 16\), model"):
    pretrained.load_pretrained(ckpt, _init(_model(hidden_dim=24), LOW_RES))


def test_missing_file_is_a_clear_error(tmp_path):
  path = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    pretrained.load_npz(path)
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    pretrained.load_pretrained(path, {})


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04truncated", None])
def test_non_npz_file_is_a_clear_error(tmp_path, content):
  path = str(tmp_path / "bad.npz")
  if content is None:  # A single .npy array is not a parameter archive.
    with open(path, "wb") as f:
      np.save(f, np.zeros(3))
  else:
    with open(path, "wb") as f:
      f.write(content)
  with pytest.raises(ValueError, match="bad.npz"):
    pretrained.load_npz(path)


def test_num_tokens_must_agree_with_the_template(ckpt):
  with pytest.raises(ValueError, match="num_tokens=64, but the model's token-mixing .* take 16"):
    pretrained.load_pretrained(ckpt, _init(_model(), LOW_RES), num_tokens=64)


@pytest.mark.parametrize("image_size", [24, 8, 28])
def test_unsupported_resolution_is_a_clear_error(ckpt, image_size):
  # 24px: 36 tokens = 2.25 x 16; 8px: fewer tokens; 28px: 49 tokens, not a multiple of 16.
  tokens = (image_size // PATCH) ** 2
  template = _abstract(_model(tokens_mlp_dim=8 * 4), image_size)
  expected = (rf"checkpoint has 16 \(4x4, 16px\) tokens; this model has {tokens} .*supported: "
              r"16\*K\^2 tokens for an integer K >= 1, e.g. 16 \(4x4, 16px\), 64 \(8x8, 32px\), "
              r"144 \(12x12, 48px\)")
  with pytest.raises(ValueError, match=expected):
    pretrained.load_pretrained(ckpt, template)
  with pytest.raises(ValueError, match="cannot be fine-tuned at"):
    pretrained.adapted_overrides(ckpt, image_size, PATCH)


def test_adapted_overrides(ckpt):
  assert pretrained.adapted_overrides(ckpt, LOW_RES, PATCH) == DIMS
  assert pretrained.adapted_overrides(pretrained.load_npz(ckpt), 48, PATCH) == dict(
      DIMS, tokens_mlp_dim=8 * 9)
  with pytest.raises(ValueError, match="trained with 4px patches, not 8px"):
    pretrained.adapted_overrides(ckpt, 32, 8)
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    pretrained.adapted_overrides(ckpt, 30, PATCH)
  with pytest.raises(ValueError, match="not a Mixer checkpoint"):
    pretrained.adapted_overrides({"stem/kernel": np.zeros((4, 4, 3, 16))}, 16, PATCH)


def test_higher_resolution_needs_the_grown_tokens_mlp_dim(ckpt):
  with pytest.raises(ValueError, match=r"tokens_mlp_dim must be 4 x 8 = 32, not 8"):
    pretrained.load_pretrained(ckpt, _abstract(_model(), 2 * LOW_RES))


def test_adapted_token_mixing_kernels_are_block_diagonal(ckpt, pretrained_params):
  overrides = pretrained.adapted_overrides(ckpt, 2 * LOW_RES, PATCH)
  assert overrides["tokens_mlp_dim"] == 32
  loaded = pretrained.load_pretrained(ckpt, _abstract(_model(**overrides), 2 * LOW_RES))
  for block in ("MixerBlock_0", "MixerBlock_1"):
    original, adapted = (p[block]["token_mixing"] for p in (pretrained_params, loaded))
    for dense, (rows, cols) in (("Dense_0", (16, 8)), ("Dense_1", (8, 16))):
      kernel = adapted[dense]["kernel"]
      assert kernel.shape == (4 * rows, 4 * cols)
      on_blocks = np.zeros(kernel.shape, bool)
      for c in range(4):
        part = (slice(c * rows, (c + 1) * rows), slice(c * cols, (c + 1) * cols))
        np.testing.assert_array_equal(kernel[part], original[dense]["kernel"])
        on_blocks[part] = True
      np.testing.assert_array_equal(kernel[~on_blocks], 0)
      np.testing.assert_array_equal(adapted[dense]["bias"], np.tile(original[dense]["bias"], 4))
    # Everything outside the token-mixing MLPs is copied unchanged.
    np.testing.assert_array_equal(loaded[block]["channel_mixing"]["Dense_0"]["kernel"],
                                  pretrained_params[block]["channel_mixing"]["Dense_0"]["kernel"])


def _to_patches(images, grid):
  """(B, grid*P, grid*P, 3) -> (B, grid*grid, P, P, 3) in row-major patch order."""
  b = images.shape[0]
  x = images.reshape(b, grid, PATCH, grid, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * grid, PATCH, PATCH, 3)


def _from_patches(patches, grid):
  b = patches.shape[0]
  x = patches.reshape(b, grid, grid, PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * PATCH, grid * PATCH, 3)


@pytest.mark.parametrize("k", [2, 3])
def test_adapted_model_on_repeated_tokens_matches_the_original(ckpt, pretrained_params, images,
                                                                k):
  """A hi-res image whose row-major token sequence is K^2 copies of the low-res one.

  Each copy of the token-mixing MLP then sees exactly the low-res sequence, channel mixing
  and LayerNorms act per token, and mean pooling over K^2 identical copies is the low-res
  mean: the adapted model's features and logits equal the original model's.
  """
  low_grid, high_res = LOW_RES // PATCH, k * LOW_RES
  patches = np.asarray(_to_patches(images, low_grid))
  np.testing.assert_array_equal(_from_patches(patches, low_grid), images)
  hi_images = _from_patches(np.tile(patches, (1, k * k, 1, 1, 1)), k * low_grid)
  np.testing.assert_array_equal(_to_patches(hi_images, k * low_grid)[:, 16:32], patches)

  overrides = pretrained.adapted_overrides(ckpt, high_res, PATCH)
  hi_model = _model(**overrides)
  loaded = pretrained.load_pretrained(ckpt, _abstract(hi_model, high_res),
                                      num_tokens=(high_res // PATCH) ** 2)
  np.testing.assert_allclose(hi_model.apply({"params": loaded}, hi_images),
                             _model().apply({"params": pretrained_params}, images),
                             rtol=1e-5, atol=1e-5)
  features = lambda p, m, x: m.clone(num_classes=0).apply(
      {"params": {n: v for n, v in p.items() if n != "head"}}, x)
  np.testing.assert_allclose(features(loaded, hi_model, hi_images),
                             features(pretrained_params, _model(), images), rtol=1e-5, atol=1e-5)
