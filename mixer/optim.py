"""Optimizers and learning-rate schedules built from the config (optax)."""
from __future__ import annotations

from typing import Any

import jax
import optax

Config = Any  # an ml_collections.ConfigDict with config_lib.base_config()'s keys


def warmup_steps(config: Config, steps_per_epoch: int) -> int:
  return int(round(config.warmup_epochs * steps_per_epoch))


def check_warmup(config: Config, total_steps: int, steps_per_epoch: int) -> None:
  """A warmup as long as the run would never decay the learning rate: a config error."""
  warmup = warmup_steps(config, steps_per_epoch)
  if warmup and warmup >= total_steps:
    raise ValueError(
        f"config.warmup_epochs={config.warmup_epochs} is {warmup} steps ({steps_per_epoch} per "
        f"epoch), not shorter than the run's {total_steps} steps: the learning rate would never "
        "decay. Lower warmup_epochs or lengthen the run.")


def learning_rate_schedule(config: Config, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine or linear decay to 0 at `total_steps`."""
  warmup = warmup_steps(config, steps_per_epoch)
  decay_steps = max(total_steps - warmup, 1)
  peak = config.learning_rate
  if config.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps)
  else:
    decay = optax.linear_schedule(peak, 0.0, decay_steps)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
  """Weight decay applies to kernels only (not biases or LayerNorm scales)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: Config,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (weight decay decoupled from the gradient, scaled by the
  learning rate) or SGD with momentum (L2: weight_decay * params added to the gradient before
  momentum, i.e. coupled); decay applies to kernels only."""
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask))
  elif config.optimizer == "sgd":
    if config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None))
  else:
    raise ValueError(f"config.optimizer={config.optimizer!r}: expected 'adamw' or 'sgd'.")
  return optax.chain(*parts)
