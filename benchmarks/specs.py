"""The benchmarked Mixer shapes: which config file, which overrides, which default batch.

Each spec names a `configs/*.py` file (so the step is the one that config trains with:
its optimizer, augmentation, stochastic depth) plus the overrides that give the shape.
"""
from __future__ import annotations

import dataclasses
import json
import importlib.util
import os
from typing import Any

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Rows of random uint8 training data kept on the device: CIFAR's 50,000 where that is
# cheap, fewer for big images (only the per-step index permutation depends on the count).
DATA_BYTES_BUDGET = 256 * 2**20
MAX_EXAMPLES = 50_000


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  config_file: str  # relative to the repository root
  config_arg: str | None
  overrides: dict[str, Any]
  batch_size: int
  num_classes: int
  description: str

  def num_examples(self, image_size: int) -> int:
    per_image = image_size * image_size * 3
    return max(min(MAX_EXAMPLES, DATA_BYTES_BUDGET // per_image), 1)


SPECS: dict[str, Spec] = {s.name: s for s in [
    Spec("ti4", "configs/cifar100_ti.py", None, {}, 128, 100,
         "Mixer-Ti/4 32x32, configs/cifar100_ti.py"),
    Spec("ti4_aug", "configs/cifar100_ti.py", None,
         {"randaugment_ops": 2, "randaugment_magnitude": 9, "random_erasing": 0.25,
          "ema_decay": 0.999}, 128, 100,
         "Mixer-Ti/4 32x32 + RandAugment(2, 9), random erasing 0.25, EMA"),
    Spec("ti4_hour", "configs/cifar100_cpu_hour.py", None, {}, 128, 100,
         "Mixer-Ti/4, channel MLP 256, 32x32, configs/cifar100_cpu_hour.py (erasing 0.25)"),
    Spec("s4", "configs/cifar100_s.py", None, {}, 128, 100,
         "Mixer-S/4 32x32, configs/cifar100_s.py (mixup/cutmix, stoch. depth 0.1)"),
    Spec("small64", "configs/cifar100_ti.py", None,
         {"model.variant": "Ti/8", "model.hidden_dim": 256, "model.tokens_mlp_dim": 256,
          "model.channels_mlp_dim": 256, "model.num_blocks": 4, "image_size": 64},
         128, 100, "small Mixer 64x64, patch 8, width 256, MLPs 256, 4 blocks"),
    # The fine-tuning recipe at 224 with 1000 classes, but AdamW (as the PyTorch peer).
    Spec("b16", "configs/cifar100_finetune.py", "B/16",
         {"optimizer": "adamw", "weight_decay": 0.05}, 8, 1000,
         "Mixer-B/16 224x224, 1000 classes, configs/cifar100_finetune.py + AdamW"),
]}
DEFAULT_ORDER = ("ti4", "ti4_aug", "s4", "small64", "b16")


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  parent = config
  *path, leaf = dotted.split(".")
  for part in path:
    parent = parent[part]
  parent[leaf] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
  """['model.dtype=bfloat16', 'ema_decay=0.999'] -> {key: value}; values as JSON, else strings."""
  overrides = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  return overrides


def load_config(spec: Spec, batch_size: int,
                extra: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The spec's config with its overrides (then `extra`), batch sizes set, no accumulation."""
  path = os.path.join(ROOT, spec.config_file)
  module_spec = importlib.util.spec_from_file_location(f"bench_config_{spec.name}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(spec.config_arg)
  overrides = {**spec.overrides, "batch_size": batch_size, "eval_batch_size": batch_size,
               "grad_accum_steps": 1, "init_from": "", **(extra or {})}
  for key, value in overrides.items():
    _set(config, key, value)
  return config
