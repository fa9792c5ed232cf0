"""Our Mixer parameters <-> timm's `MlpMixer` state dict, stored as safetensors.

timm (huggingface/pytorch-image-models, `timm.models.mlp_mixer.MlpMixer`) is the Mixer of
PyTorch users. Its state dict names and layouts, against ours (the published `.npz` tree):

  stem.proj.weight (D, C, p, p)              stem/kernel (p, p, C, D)
  blocks.{i}.norm1.weight / .bias            MixerBlock_{i}/LayerNorm_0/scale / bias
  blocks.{i}.mlp_tokens.fc{1,2}.weight       MixerBlock_{i}/token_mixing/Dense_{0,1}/kernel (T)
  blocks.{i}.norm2 ...                       MixerBlock_{i}/LayerNorm_1 ...
  blocks.{i}.mlp_channels.fc{1,2} ...        MixerBlock_{i}/channel_mixing/Dense_{0,1} ...
  norm.weight / .bias                        pre_head_layer_norm/scale / bias
  head.weight (K, D) / .bias                 head/kernel (D, K) / bias

(every Linear weight is our Dense kernel transposed). Both flatten the patch grid row-major,
so tokens need no reordering. Two things the state dict cannot say travel in the JSON written
beside it (`metadata`): the constructor arguments, with GELU's tanh approximation as ours
computes it (timm's default `nn.GELU` is the exact erf form: logits 7.6e-4 off for a Ti/4
after 500 steps, measured on CPU, against the 1e-4 the tests hold), and the
preprocessing (uint8 RGB / 255, then (x - 0.5) / 0.5: our inputs in [-1, 1]).

Only `safetensors`' numpy API is used: neither torch nor timm is needed to write or read.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mixer import errors

# timm names timm.layers.get_act_layer resolves; MlpMixer takes the resolved class as act_layer.
ACT_LAYER = "gelu_tanh"
PREPROCESSING = {
    "input": "RGB uint8 images, resized (bilinear) to img_size x img_size",
    "scale": 1.0 / 255.0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    "layout": "NCHW float32: (x / 255 - mean) / std, i.e. x / 127.5 - 1",
}
_LINEAR = {"mlp_tokens.fc1": "token_mixing/Dense_0", "mlp_tokens.fc2": "token_mixing/Dense_1",
           "mlp_channels.fc1": "channel_mixing/Dense_0",
           "mlp_channels.fc2": "channel_mixing/Dense_1"}
_NORM = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_1"}


def _name_pairs(num_blocks: int) -> list[tuple[str, str, str]]:
  """(timm key, our key, kind) for every tensor; kind says how the layout changes."""
  pairs = [("stem.proj.weight", "stem/kernel", "conv"), ("stem.proj.bias", "stem/bias", "copy")]
  for i in range(num_blocks):
    for timm_name, ours in _NORM.items():
      pairs += [(f"blocks.{i}.{timm_name}.weight", f"MixerBlock_{i}/{ours}/scale", "copy"),
                (f"blocks.{i}.{timm_name}.bias", f"MixerBlock_{i}/{ours}/bias", "copy")]
    for timm_name, ours in _LINEAR.items():
      pairs += [(f"blocks.{i}.{timm_name}.weight", f"MixerBlock_{i}/{ours}/kernel", "linear"),
                (f"blocks.{i}.{timm_name}.bias", f"MixerBlock_{i}/{ours}/bias", "copy")]
  pairs += [("norm.weight", "pre_head_layer_norm/scale", "copy"),
            ("norm.bias", "pre_head_layer_norm/bias", "copy"),
            ("head.weight", "head/kernel", "linear"), ("head.bias", "head/bias", "copy")]
  return pairs


def _num_blocks(keys: Any, pattern: str) -> int:
  found = {int(m.group(1)) for m in map(re.compile(pattern).match, keys) if m}
  return max(found) + 1 if found else 0


def _relayout(value: np.ndarray, kind: str, to_timm: bool) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(value.T)
  if kind == "conv":  # ours (p, p, C, D) <-> timm (D, C, p, p)
    return np.ascontiguousarray(value.transpose((3, 2, 0, 1) if to_timm else (2, 3, 1, 0)))
  return np.ascontiguousarray(value)


def to_timm(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our flat ('/'-joined) float parameters -> timm's state dict (float32 numpy arrays)."""
  pairs = _name_pairs(_num_blocks(flat, r"^MixerBlock_(\d+)/"))
  if "head/kernel" not in flat:
    pairs = [p for p in pairs if not p[1].startswith("head/")]
  return {t: _relayout(np.asarray(flat[ours], np.float32), kind, True)
          for t, ours, kind in pairs}


def from_timm(state: Mapping[str, np.ndarray], name: str = "the file") -> dict[str, np.ndarray]:
  """timm's MlpMixer state dict -> our flat parameters; CheckpointError for any other model."""
  pairs = _name_pairs(_num_blocks(state, r"^blocks\.(\d+)\."))
  if "head.weight" not in state:
    pairs = [p for p in pairs if not p[0].startswith("head.")]
  missing = [t for t, _, _ in pairs if t not in state]
  extra = sorted(set(state) - {t for t, _, _ in pairs})
  if missing or extra:
    raise errors.CheckpointError(
        f"{name} is not a timm MlpMixer state dict (MixerBlock, no stem norm): "
        + "; ".join(part for part in (
            f"missing {', '.join(missing[:8])}" if missing else "",
            f"unexpected {', '.join(extra[:8])}" if extra else "") if part))
  return {ours: _relayout(np.asarray(state[t], np.float32), kind, False)
          for t, ours, kind in pairs}


def _mlp_ratio(width: int, embed_dim: int) -> float:
  """A ratio r with int(r * embed_dim) == width, as timm's MixerBlock computes its widths."""
  ratio = width / embed_dim
  for _ in range(4):
    if int(ratio * embed_dim) == width:
      return ratio
    ratio = float(np.nextafter(ratio, np.inf))
  raise errors.CheckpointError(f"No float mlp_ratio gives timm's MixerBlock a width of {width} "
                               f"at embed_dim {embed_dim}.")


def constructor_args(flat: Mapping[str, Any]) -> dict[str, Any]:
  """timm `MlpMixer(**args)` keyword arguments for our flat parameters (square images)."""
  patch, _, in_chans, embed_dim = np.shape(flat["stem/kernel"])
  tokens, tokens_dim = np.shape(flat["MixerBlock_0/token_mixing/Dense_0/kernel"])
  side = int(round(tokens ** 0.5))
  if side * side != tokens:
    raise errors.CheckpointError(f"{tokens} tokens do not form a square patch grid.")
  channels_dim = np.shape(flat["MixerBlock_0/channel_mixing/Dense_0/kernel"])[1]
  return {"num_classes": int(np.shape(flat["head/bias"])[0]) if "head/bias" in flat else 0,
          "img_size": int(side * patch), "in_chans": int(in_chans), "patch_size": int(patch),
          "num_blocks": _num_blocks(flat, r"^MixerBlock_(\d+)/"), "embed_dim": int(embed_dim),
          "mlp_ratio": [_mlp_ratio(int(tokens_dim), int(embed_dim)),
                        _mlp_ratio(int(channels_dim), int(embed_dim))]}


def metadata(flat: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
  """What rebuilds the model in timm: the JSON written beside the safetensors file."""
  return {"format": "timm.models.mlp_mixer.MlpMixer state dict (safetensors)",
          "constructor": constructor_args(flat), "act_layer": ACT_LAYER,
          "rebuild": ("timm.models.mlp_mixer.MlpMixer(**constructor, act_layer="
                      "timm.layers.get_act_layer(act_layer)); "
                      "model.load_state_dict(safetensors.torch.load_file(path), strict=True)"),
          "preprocessing": PREPROCESSING, **extra}


def metadata_path(path: str | os.PathLike) -> str:
  """model.safetensors -> model.json."""
  return os.path.splitext(os.fspath(path))[0] + ".json"


def read_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file; MissingFileError / CheckpointError otherwise."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"No safetensors file at {path!r}.")
  try:
    return load_file(path)
  except (SafetensorError, ValueError, TypeError, OSError, json.JSONDecodeError) as e:
    raise errors.CheckpointError(f"{path!r} is not a readable safetensors file "
                                 f"({type(e).__name__}: {e}).") from e
