"""MLP-Mixer (Tolstikhin et al. 2021, arXiv 2105.01601) in Flax Linen.

The parameter tree matches the published Mixer `.npz` checkpoints exactly:
`stem`, `MixerBlock_{i}/{LayerNorm_0, token_mixing/Dense_{0,1}, LayerNorm_1,
channel_mixing/Dense_{0,1}}`, `pre_head_layer_norm`, `head`.

What the model computes on the way (as big_vision's Mixer returns it beside the logits) is
sown into the `intermediates` collection, which costs nothing unless asked for: `features`
returns it, mean-pooled, with the logits, from the same parameters.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixer import errors, layer_norm, rng_streams

# size -> (hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (128, 8, 64, 512),  # ~1.1M params at 32px/4
    "XS": (256, 8, 128, 1024),  # ~4.3M params at 32px/4.
    "S": (512, 8, 256, 2048),
    "B": (768, 12, 384, 3072),
    "L": (1024, 24, 512, 4096),
    "H": (1280, 32, 640, 5120),
}
LN_EPSILON = 1e-6


class TokenDense(nn.Module):
  """nn.Dense across the token axis of (batch, tokens, channels), without transposing it.

  Holds exactly nn.Dense's parameters (kernel (tokens, features), bias (features,)), so the
  tree matches the published checkpoints, but computes kernel.T @ x[b] for every example
  as one batched matmul: no activation transposes, and the weight gradient is a batch of
  small matmuls instead of one with a 65,536-long contraction. Faster on CPU than swapaxes +
  nn.Dense for S/4 and no slower elsewhere (docs/BENCHMARKS.md).
  """
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, _ = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (tokens, self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # Broadcasting the (small) kernel gives both operands a batch dimension, so XLA emits a
    # plain batched matmul rather than transposing the activations around a 2-D one.
    kernel_t = jnp.broadcast_to(kernel.T, (batch, self.features, tokens))
    return jnp.einsum("bft,btc->bfc", kernel_t, x) + bias[:, None]


# How the token-mixing MLP is computed; both hold the same parameters (nn.Dense's).
TOKEN_MIXING = ("transpose", "batched")


class MlpBlock(nn.Module):
  """Dense -> GELU (tanh approximation) -> Dense back to the input width.

  Mixes the last axis of (batch, tokens, channels), or the token axis when `over_tokens`:
  with token_mixing 'transpose' as the official implementation does (swap the token and
  channel axes around nn.Dense), with 'batched' through TokenDense (no transposes).
  """
  mlp_dim: int
  dropout: float = 0.0
  over_tokens: bool = False
  token_mixing: str = "transpose"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    batched = self.over_tokens and self.token_mixing == "batched"
    transposed = self.over_tokens and not batched
    if transposed:
      x = jnp.swapaxes(x, 1, 2)  # (batch, channels, tokens)
    layer = TokenDense if batched else nn.Dense
    width = x.shape[1] if batched else x.shape[-1]
    dense = lambda features, name: layer(features, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    y = nn.gelu(dense(self.mlp_dim, "Dense_0")(x))
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    y = dense(width, "Dense_1")(y)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return jnp.swapaxes(y, 1, 2) if transposed else y


class MixerBlock(nn.Module):
  """Token mixing then channel mixing, each pre-LayerNorm with a residual."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  drop_path: float = 0.0  # stochastic-depth rate of this block
  dropout: float = 0.0
  token_mixing: str = "transpose"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # One keep/drop decision per example, shared by all its tokens and channels.
    drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2))
    y = layer_norm.LayerNorm(epsilon=LN_EPSILON, **kw)(x)
    y = MlpBlock(self.tokens_mlp_dim, self.dropout, over_tokens=True,
                 token_mixing=self.token_mixing, name="token_mixing", **kw)(y, train)
    x = x + drop_path(y, deterministic=not train)
    # Channel mixing on (batch*tokens, channels): with 3-D activations XLA:CPU transposed the
    # gradient before each weight-gradient dot (a copy plus a slower oneDNN layout); flat, the
    # Ti/4 train step ran 1.06x faster (docs/BENCHMARKS.md). Same parameters, same numbers.
    batch, tokens, channels = x.shape
    y = layer_norm.LayerNorm(epsilon=LN_EPSILON, **kw)(x.reshape(batch * tokens, channels))
    y = MlpBlock(self.channels_mlp_dim, self.dropout, name="channel_mixing", **kw)(y, train)
    return x + drop_path(y.reshape(batch, tokens, channels), deterministic=not train)


def drop_path_rates(stoch_depth: float, num_blocks: int) -> list[float]:
  """Stochastic-depth rate of each block: 0 for the first, rising linearly to `stoch_depth`."""
  return [stoch_depth * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


FEATURES = "intermediates"  # the collection MlpMixer sows its representations into


def feature_names(num_blocks: int) -> list[str]:
  """The names `features` returns, in depth order: stem, block_0 .. block_{n-1}, pre_logits."""
  return ["stem", *(f"block_{i}" for i in range(num_blocks)), "pre_logits"]


class MlpMixer(nn.Module):
  """Patch stem, Mixer blocks, pre-head LayerNorm, mean pooling, zero-init head.

  Returns logits of shape (batch, num_classes), or the pooled features of shape
  (batch, hidden_dim) when `num_classes == 0`. When the `intermediates` collection is
  mutable (see `features`) it also sows the stem's tokens ("stem_tokens", (batch, tokens,
  hidden_dim)), each block's output ("block_{i}", same shape) and the pooled pre-logits
  ("pre_logits", (batch, hidden_dim)); otherwise sowing does nothing.
  """
  num_classes: int
  patch_size: int
  hidden_dim: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  stoch_depth: float = 0.0
  dropout: float = 0.0
  token_mixing: str = "transpose"  # or "batched"; see TOKEN_MIXING and resolve_token_mixing
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if images.ndim != 4:
      raise errors.DataError(f"MlpMixer expects NHWC images, got shape {images.shape}.")
    _, height, width, _ = images.shape
    p = self.patch_size
    if height % p or width % p:
      raise errors.DataError(
          f"Image size {height}x{width} is not divisible by the patch size {p}; "
          "resize the images (config.image_size) or pick another patch size.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding="VALID", name="stem", **kw)(
        images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, channels)
    self.sow(FEATURES, "stem_tokens", x)  # "stem" names the Conv
    for i, rate in enumerate(drop_path_rates(self.stoch_depth, self.num_blocks)):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, rate, self.dropout,
                     self.token_mixing, name=f"MixerBlock_{i}", **kw)(x, train)
      self.sow(FEATURES, f"block_{i}", x)
    x = layer_norm.LayerNorm(epsilon=LN_EPSILON, name="pre_head_layer_norm", **kw)(x)
    x = jnp.mean(x, axis=1)
    self.sow(FEATURES, "pre_logits", x)
    if self.num_classes == 0:
      return x
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head", **kw)(x)


def features(model: MlpMixer, params: Any, images: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(logits, {name: (batch, hidden_dim) features}) of float images, in evaluation mode.

  One application of `model` with `params` (the same parameters and the same logits as
  `model.apply`); the names are `feature_names(model.num_blocks)` in that (depth) order: the
  stem's and every block's output tokens mean-pooled over the tokens, and the pre-logits
  (after the pre-head LayerNorm, pooled: what the head sees). Jittable (jax.jit hands dicts
  back with sorted keys: iterate `feature_names` for depth order); a batch sharded over
  devices gives features sharded the same way.
  """
  logits, state = model.apply({"params": params}, images, train=False, mutable=[FEATURES])
  sown = {"stem" if name == "stem_tokens" else name: values[0]
          for name, values in state[FEATURES].items()}
  pooled = {name: value if value.ndim == 2 else jnp.mean(value, axis=1)
            for name, value in sown.items()}
  return logits, {name: pooled[name] for name in feature_names(model.num_blocks)}


def parse_variant(variant: str) -> dict[str, int]:
  """'B/16' -> dict(patch_size=16, hidden_dim=768, num_blocks=12, ...)."""
  size, sep, patch = variant.partition("/")
  if not sep or size not in SIZES or not patch.isdigit() or int(patch) < 1:
    raise errors.ConfigError(
        f"Unknown Mixer variant {variant!r}: expected SIZE/PATCH with SIZE one of "
        f"{', '.join(SIZES)} and PATCH a positive integer, e.g. 'S/16' or 'B/4'.")
  hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim = SIZES[size]
  return dict(patch_size=int(patch), hidden_dim=hidden_dim, num_blocks=num_blocks,
              tokens_mlp_dim=tokens_mlp_dim, channels_mlp_dim=channels_mlp_dim)


OVERRIDES = ("hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim", "stoch_depth",
             "dropout", "token_mixing", "dtype", "param_dtype")


def resolve_dtype(name: str, platform: str) -> str:
  """The compute dtype for a config's `model.dtype` on `platform` ('cpu', 'gpu', 'tpu')."""
  if name != "auto":
    return name
  return "float32" if platform == "cpu" else "bfloat16"


def resolve_token_mixing(name: str, platform: str) -> str:
  """'auto' -> 'batched' (TokenDense) on CPU, where it was measured faster (docs/BENCHMARKS.md),
  else the official 'transpose' formulation; other names are checked and returned."""
  if name == "auto":
    return "batched" if platform == "cpu" else "transpose"
  if name not in TOKEN_MIXING:
    raise errors.ConfigError(
        f"Unknown token_mixing {name!r}: expected 'auto' or one of {TOKEN_MIXING}.")
  return name


def create_model(variant: str, num_classes: int, **overrides: Any) -> MlpMixer:
  """Builds a Mixer by variant name; explicit keyword arguments win over the size's defaults.

  token_mixing defaults to 'auto' (resolve_token_mixing on the default backend)."""
  unknown = sorted(set(overrides) - set(OVERRIDES))
  if unknown:
    raise TypeError(f"create_model got unknown overrides {unknown}; allowed: {list(OVERRIDES)}.")
  if num_classes < 0:
    raise ValueError(f"num_classes must be >= 0, got {num_classes}.")
  kwargs = parse_variant(variant)
  kwargs.update({k: v for k, v in overrides.items() if v is not None})
  mixing = kwargs.get("token_mixing", "auto")
  kwargs["token_mixing"] = resolve_token_mixing(
      mixing, jax.default_backend() if mixing == "auto" else "")
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return MlpMixer(num_classes=num_classes, **kwargs)


def count_params(model: nn.Module, image_size: int, channels: int = 3) -> int:
  """Number of parameters, computed from shapes only (nothing is allocated)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return sum(int(x.size) for x in jax.tree.leaves(shapes["params"]))


def build_model(config: Any, num_classes: int, platform: str | None = None) -> MlpMixer:
  """The Mixer a training config's `model` section describes, its "auto" dtype and token
  mixing resolved for `platform` (default: JAX's default backend)."""
  m = config.model
  platform = platform or jax.default_backend()
  dims = {k: getattr(m, k) for k in ("hidden_dim", "num_blocks", "tokens_mlp_dim",
                                     "channels_mlp_dim")}
  return create_model(m.variant, num_classes, stoch_depth=m.stoch_depth, dropout=m.dropout,
                      dtype=resolve_dtype(m.dtype, platform),
                      token_mixing=resolve_token_mixing(getattr(m, "token_mixing", "auto"),
                                                        platform), **dims)


def init_params(model: MlpMixer, image_size: int, seed: int) -> Any:
  """The model's initial parameters, from the run's `INIT` random stream."""
  key = rng_streams.key(seed, rng_streams.INIT)
  return model.init(key, jnp.zeros((1, image_size, image_size, 3)), train=False)["params"]
