"""Published MLP-Mixer `.npz` checkpoints: load, export, and fit them to a model to fine-tune.

The same for timm's `MlpMixer` state dicts in `.safetensors` files (`export_timm`,
`load_timm`; the name and layout mapping is `timm_format`'s): `load_checkpoint` reads either.

The checkpoints released with google-research/vision_transformer (e.g.
https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz) are flat npz
archives whose keys are the '/'-joined paths of the `models.MlpMixer` parameter tree:
`stem/kernel`, `MixerBlock_3/token_mixing/Dense_0/kernel`, `pre_head_layer_norm/scale`,
`head/bias`, ... `load_pretrained` checks such a file against the params of the model to
fine-tune, replaces the head when the number of classes changes, and adapts the token-mixing
MLPs when the model sees more tokens than the checkpoint (a higher image resolution).

Resolution adaptation (Tolstikhin et al. 2021, arXiv 2105.01601, appendix on fine-tuning):
at K times the pretraining resolution the model has S' = K^2 S tokens instead of S. The
token-mixing MLP of every block is then initialised as K^2 independent copies of the
pretrained one by making its weights block-diagonal, which also multiplies its hidden width
by K^2: the model to fine-tune must be built with `tokens_mlp_dim = K^2 * pretrained` (see
`adapted_overrides`). Kernels (S, Ds) -> (K^2 S, K^2 Ds) and (Ds, S) -> (K^2 Ds, K^2 S) with
the pretrained kernel on the diagonal blocks and zeros elsewhere; biases are tiled K^2 times.

Which tokens each copy sees: copy c (c = 0 .. K^2-1) reads and writes tokens c*S .. (c+1)*S-1
of the model's token sequence. `MlpMixer` flattens its (K h) x (K w) patch grid row-major and
never reorders tokens, so when K divides h, copy c sees the full-width horizontal band of
patch rows c*h/K .. (c+1)*h/K - 1 (otherwise a run of S consecutive row-major patches that
wraps across rows), and treats it as if it were the pretraining h x w grid in row-major order.
This follows the paper's description (the S' tokens are split into K^2 equal parts, each
processed by a copy of the pretrained token-mixing MLP) with the simplest split for our
model: contiguous parts of the row-major sequence. The paper's text was not at hand when this
was written; any other split (e.g. K-strided sub-grids) is these weights with rows and columns
permuted.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np

from mixer import errors, param_trees, timm_format

PathOrFlat = str | os.PathLike | Mapping[str, Any]

HEAD_KEYS = ("head/kernel", "head/bias")
FIRST_TOKEN_KERNEL = "MixerBlock_0/token_mixing/Dense_0/kernel"
_TOKEN_MIXING = re.compile(r"^MixerBlock_\d+/token_mixing/Dense_[01]/(kernel|bias)$")
_BLOCK = re.compile(r"^MixerBlock_(\d+)/")
_DOWNLOAD_HINT = ("Published Mixer checkpoints are downloadable, e.g. "
                  "https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz")


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The flat archive at `path`: '/'-joined parameter paths -> numpy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"No checkpoint file at {path!r}. {_DOWNLOAD_HINT}")
  try:
    archive = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise errors.CheckpointError(
        f"{path!r} is not an .npz archive ({type(e).__name__}: {e}).") from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise errors.CheckpointError(
        f"{path!r} holds a single .npy array, not an .npz archive of parameters.")
  with archive:
    try:
      return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
      raise errors.CheckpointError(
          f"{path!r} is a corrupt .npz archive ({type(e).__name__}: {e}).") from e


def flatten_params(params: Any) -> dict[str, Any]:
  """Nested params -> {'/'-joined path: leaf}, the layout of the published archives."""
  if not isinstance(params, Mapping):
    raise TypeError(f"Expected a nested dict of parameters, got {type(params).__name__}.")
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def _write_atomically(path: str | os.PathLike, write: Any) -> str:
  """Calls write(file object) on a temporary file beside `path`, then renames it to `path`
  (readable by all: a checkpoint is meant to be shared). Returns the absolute path."""
  path = os.path.abspath(os.fspath(path))
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600.
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  return path


def _float32_arrays(params: Any) -> dict[str, np.ndarray]:
  return {k: np.asarray(jax.device_get(v)).astype(np.float32)
          for k, v in flatten_params(params).items()}


def export_npz(params: Any, path: str | os.PathLike) -> None:
  """Writes nested params as a published-layout npz (float32), atomically."""
  arrays = _float32_arrays(params)
  _write_atomically(path, lambda f: np.savez(f, **arrays))


def export_timm(params: Any, path: str | os.PathLike, **extra_metadata: Any) -> str:
  """Writes nested params as timm's MlpMixer state dict (safetensors, float32) and, beside it,
  the JSON that rebuilds the model (`timm_format.metadata` plus `extra_metadata`); both
  atomically. Returns the JSON's path."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  flat = _float32_arrays(params)
  meta = timm_format.metadata(flat, **extra_metadata)
  state = timm_format.to_timm(flat)
  _write_atomically(path, lambda f: f.write(save(state, metadata={"format": "pt"})))
  text = json.dumps(meta, indent=2) + "\n"
  return _write_atomically(timm_format.metadata_path(path), lambda f: f.write(text.encode()))


def load_timm(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A timm MlpMixer safetensors file as our flat ('/'-joined, published-layout) arrays."""
  path = os.fspath(path)
  return timm_format.from_timm(timm_format.read_state(path), repr(path))


def load_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Flat published-layout arrays from an .npz, or from timm's .safetensors (`load_timm`)."""
  if os.fspath(path).endswith(".safetensors"):
    return load_timm(path)
  return load_npz(path)


def _as_flat(path_or_flat: PathOrFlat) -> tuple[dict[str, np.ndarray], str]:
  """(flat arrays, a name for messages)."""
  if isinstance(path_or_flat, (str, os.PathLike)):
    return load_checkpoint(path_or_flat), repr(os.fspath(path_or_flat))
  return {k: np.asarray(v) for k, v in path_or_flat.items()}, "the checkpoint"


def block_diagonal(value: np.ndarray, copies: int) -> np.ndarray:
  """`copies` copies of a 2-D kernel on the diagonal (zeros elsewhere); 1-D biases tiled."""
  if value.ndim == 1:
    return np.tile(value, copies)
  return np.kron(np.eye(copies, dtype=value.dtype), value)


def _grid(tokens: int, patch: int | None) -> str:
  """'196 (14x14, 224px)' for a square grid of `patch`-pixel patches."""
  side = math.isqrt(tokens)
  if side * side != tokens:
    return str(tokens)
  pixels = f", {side * patch}px" if patch else ""
  return f"{tokens} ({side}x{side}{pixels})"


def _checkpoint_patch(flat: Mapping[str, np.ndarray]) -> int | None:
  stem = flat.get("stem/kernel")
  return int(stem.shape[0]) if stem is not None and stem.ndim == 4 else None


def _resolution_factor(flat: Mapping[str, np.ndarray], tokens: int
                       ) -> tuple[int | None, str | None]:
  """(K^2, None) when `tokens` is K^2 times the checkpoint's token count, else (None, why)."""
  ckpt_tokens = flat[FIRST_TOKEN_KERNEL].shape[0]
  patch = _checkpoint_patch(flat)
  factor = tokens // ckpt_tokens if tokens % ckpt_tokens == 0 else 0
  k = math.isqrt(factor)
  if factor and k * k == factor:
    return factor, None
  examples = ", ".join(_grid(ckpt_tokens * n * n, patch) for n in (1, 2, 3, 4))
  return None, (f"checkpoint has {_grid(ckpt_tokens, patch)} tokens; this model has "
                f"{_grid(tokens, patch)}; supported: {ckpt_tokens}*K^2 tokens for an integer "
                f"K >= 1, e.g. {examples}")


def _token_factor(flat: Mapping[str, np.ndarray], tokens: int, tokens_mlp_dim: int
                  ) -> tuple[int | None, str | None]:
  """Like `_resolution_factor`, also checking that tokens_mlp_dim grew by the same K^2."""
  factor, why = _resolution_factor(flat, tokens)
  ckpt_mlp_dim = flat[FIRST_TOKEN_KERNEL].shape[1]
  if factor is None or tokens_mlp_dim == factor * ckpt_mlp_dim:
    return factor, why
  return None, (
      f"this model has {factor}x the checkpoint's {tokens // factor} tokens (K="
      f"{math.isqrt(factor)}), so its tokens_mlp_dim must be {factor} x {ckpt_mlp_dim} = "
      f"{factor * ckpt_mlp_dim}, not {tokens_mlp_dim}: build it with create_model(..., "
      f"tokens_mlp_dim={factor * ckpt_mlp_dim}) (see pretrained.adapted_overrides)")


def adapted_overrides(flat_npz: PathOrFlat, image_size: int, patch_size: int) -> dict[str, int]:
  """The `create_model` dimension overrides under which the checkpoint fits at `image_size`.

  Returns hidden_dim, num_blocks, channels_mlp_dim as in the checkpoint and tokens_mlp_dim
  multiplied by K^2 when `image_size` is K times the pretraining resolution. Raises a
  CheckpointError naming the supported resolutions when there is no such integer K.
  """
  flat, name = _as_flat(flat_npz)
  needed = (FIRST_TOKEN_KERNEL, "stem/kernel", "MixerBlock_0/channel_mixing/Dense_0/kernel")
  absent = [k for k in needed if k not in flat]
  if absent:
    raise errors.CheckpointError(
        f"{name} is not a Mixer checkpoint: it has no {', '.join(absent)}.")
  ckpt_patch = _checkpoint_patch(flat)
  if patch_size != ckpt_patch:
    raise errors.CheckpointError(f"{name} was trained with {ckpt_patch}px patches, not "
                                 f"{patch_size}px: use a /{ckpt_patch} variant.")
  if image_size % patch_size:
    raise errors.ConfigError(
        f"image_size {image_size} is not divisible by the patch size {patch_size}.")
  factor, why = _resolution_factor(flat, (image_size // patch_size) ** 2)
  if why:
    raise errors.CheckpointError(f"{name} cannot be fine-tuned at {image_size}px: {why}.")
  blocks = {int(m.group(1)) for m in map(_BLOCK.match, flat) if m}
  return dict(hidden_dim=int(flat["stem/kernel"].shape[-1]), num_blocks=len(blocks),
              tokens_mlp_dim=factor * int(flat[FIRST_TOKEN_KERNEL].shape[1]),
              channels_mlp_dim=int(flat["MixerBlock_0/channel_mixing/Dense_0/kernel"].shape[1]))


def _head(flat: Mapping[str, np.ndarray], template: Mapping[str, Any]) -> dict[str, Any]:
  """The checkpoint's head when its shapes match the model's, else the model's own."""
  wanted = [k for k in HEAD_KEYS if k in template]
  if all(k in flat and flat[k].shape == template[k].shape for k in wanted):
    return {k: np.asarray(flat[k], template[k].dtype) for k in wanted}
  logging.info("Replacing the checkpoint's head %s with the model's %s.",
               [flat[k].shape for k in HEAD_KEYS if k in flat],
               [template[k].shape for k in wanted])
  return {k: (np.zeros(template[k].shape, template[k].dtype)
              if isinstance(template[k], jax.ShapeDtypeStruct)
              else np.asarray(jax.device_get(template[k]))) for k in wanted}


def load_pretrained(path_or_flat: PathOrFlat, template_params: Any, *,
                    num_tokens: int | None = None) -> Any:
  """Params shaped like `template_params`, filled from a published-layout checkpoint.

  Args:
    path_or_flat: an .npz path, or its `load_npz` dict.
    template_params: the freshly initialised params of the model to fine-tune (arrays or
      `jax.ShapeDtypeStruct`s); they give the expected keys, shapes and dtypes.
    num_tokens: the model's token count, (image_size // patch_size)**2; when given it must
      agree with the template (guards against a template initialised at another size).

  Returns:
    A nested dict of numpy arrays in the template's dtypes. The head (`head/*`) is taken from
    the checkpoint when its shapes match the template's, otherwise the template's (zero) head
    is kept; a template without a head drops it. Token-mixing weights are made block-diagonal
    when the model has K^2 times the checkpoint's tokens (see the module docstring).

  Raises:
    errors.CheckpointError (a ValueError): listing every key missing from or extra in the
      checkpoint, every mis-shaped key, and an unsupported token count; nothing is returned
      partially.
  """
  flat, name = _as_flat(path_or_flat)
  template = flatten_params(template_params)
  problems, factor = [], 1
  if (FIRST_TOKEN_KERNEL in flat and FIRST_TOKEN_KERNEL in template
      and flat[FIRST_TOKEN_KERNEL].ndim == len(template[FIRST_TOKEN_KERNEL].shape) == 2):
    tokens, tokens_mlp_dim = template[FIRST_TOKEN_KERNEL].shape
    if num_tokens is not None and num_tokens != tokens:
      problems.append(f"num_tokens={num_tokens}, but the model's token-mixing layers take "
                      f"{tokens} tokens (was the template initialised at another image size?)")
    factor, why = _token_factor(flat, tokens, tokens_mlp_dim)
    if why:
      problems.append(why)
  missing, extra, _ = param_trees.diff(flat, template, ignore=frozenset(HEAD_KEYS))
  if missing:
    problems.append(f"missing from the checkpoint: {', '.join(missing)}")
  if extra:
    problems.append(f"in the checkpoint but not in the model: {', '.join(extra)}")
  params = {}
  for key, spec in template.items():
    if key in HEAD_KEYS or key not in flat:
      continue
    value = flat[key]
    if _TOKEN_MIXING.match(key):
      if factor is None:
        continue  # The unsupported token count is reported once, above.
      if factor > 1 and value.ndim in (1, 2):
        value = block_diagonal(value, factor)
    if value.shape != tuple(spec.shape):
      adapted = f", adapted to {value.shape}" if value is not flat[key] else ""
      problems.append(f"{key}: checkpoint {flat[key].shape}{adapted}, model {tuple(spec.shape)}")
      continue
    params[key] = np.asarray(value, spec.dtype)
  if problems:
    raise errors.CheckpointError(f"{name} does not fit the model ({len(problems)} problem(s)):"
                                 "\n  - " + "\n  - ".join(problems))
  params.update(_head(flat, template))
  if factor and factor > 1:
    logging.info("Token-mixing MLPs made block-diagonal: %d copies each.", factor)
  return flax.traverse_util.unflatten_dict(params, sep="/")
