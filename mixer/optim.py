"""Optimizers and learning-rate schedules built from the config (optax).

`config.optimizer` (weight decay applies to kernels only, never biases or LayerNorm scales):
- 'adamw': AdamW, decay decoupled from the gradient and scaled by the learning rate.
- 'sgd': SGD with momentum, L2 (weight_decay * params) added to the gradient.
- 'muon': optax.contrib.muon for the hidden 2-D kernels (the token- and channel-mixing Dense
  layers), its updates scaled to AdamW's RMS (consistent_rms=0.2, Liu et al. 2025) so that
  learning_rate and weight_decay carry over from AdamW; AdamW for the rest. Among the rest
  are the patch-embedding stem (a 4-D conv kernel) and the head, the input and output layers,
  which Muon's authors leave to AdamW.
- 'schedule_free_adamw': optax.contrib.schedule_free over AdamW without momentum, warmup then
  a constant learning rate (no decay, as its authors recommend). The trained parameters are
  its gradient points; evaluate and export `eval_params(config, opt_state, params)` (a weight
  EMA on top is refused by config_lib.validate).
- 'lion': optax.lion (sign updates: a learning rate ~3-10x below AdamW's, weight decay ~3-10x
  above).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from mixer import errors

Config = Any  # an ml_collections.ConfigDict with config_lib.base_config()'s keys

SCHEDULE_FREE = "schedule_free_adamw"
# config_lib.OPTIMIZERS lists the same names (this module imports no ml_collections).
OPTIMIZERS = ("adamw", "sgd", "muon", SCHEDULE_FREE, "lion")
# Muon's orthogonalized update of an m x n kernel, times 0.2 * sqrt(max(m, n)), has about
# AdamW's update RMS (0.2-0.4): one learning rate and weight decay serve both halves.
MUON_CONSISTENT_RMS = 0.2


def warmup_steps(config: Config, steps_per_epoch: int) -> int:
  return int(round(config.warmup_epochs * steps_per_epoch))


def check_warmup(config: Config, total_steps: int, steps_per_epoch: int) -> None:
  """A warmup as long as the run would never decay the learning rate: a config error."""
  warmup = warmup_steps(config, steps_per_epoch)
  if warmup and warmup >= total_steps:
    raise errors.ConfigError(
        f"config.warmup_epochs={config.warmup_epochs} is {warmup} steps ({steps_per_epoch} per "
        f"epoch), not shorter than the run's {total_steps} steps: the learning rate would never "
        "decay. Lower warmup_epochs or lengthen the run.")


def learning_rate_schedule(config: Config, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine or linear decay to 0 at `total_steps`; for
  schedule_free_adamw the warmup then a constant rate (config.lr_schedule does not apply)."""
  warmup = warmup_steps(config, steps_per_epoch)
  peak = config.learning_rate
  if config.optimizer == SCHEDULE_FREE:
    return optax.warmup_constant_schedule(0.0, peak, warmup)
  decay_steps = max(total_steps - warmup, 1)
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


def muon_labels(params):
  """'muon' for the 2-D kernels inside the Mixer blocks, 'adamw' for every other parameter
  (the stem's 4-D conv kernel, the head, biases, LayerNorm scales)."""
  def label(path, p):
    top = getattr(path[0], "key", None) if path else None
    return "muon" if p.ndim == 2 and str(top).startswith("MixerBlock_") else "adamw"
  return jax.tree_util.tree_map_with_path(label, params)


def schedule_free_adamw(schedule: optax.Schedule, weight_decay: float,
                        mask=decay_mask) -> optax.GradientTransformationExtraArgs:
  """optax.contrib.schedule_free_adamw's own composition (AdamW without momentum inside
  schedule_free, b1=0.9, b2=0.999), with weight decay masked to `mask` (the alias decays
  every parameter; mask=None does the same)."""
  base = optax.chain(
      optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(schedule))
  return optax.contrib.schedule_free(base, learning_rate=schedule, b1=0.9)


def make_optimizer(config: Config,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping, then config.optimizer (see the module docstring); weight decay on
  kernels only."""
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  wd, name = config.weight_decay, config.optimizer
  if name == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=wd, mask=decay_mask))
  elif name == "sgd":
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None))
  elif name == "muon":
    # Every parameter the partition hands to muon is a 2-D kernel: muon's own AdamW half
    # receives none, and its (unmasked) decay is the kernels' decay.
    parts.append(optax.partition({
        "muon": optax.contrib.muon(schedule, weight_decay=wd,
                                   consistent_rms=MUON_CONSISTENT_RMS),
        "adamw": optax.adamw(schedule, weight_decay=wd, mask=decay_mask),
    }, muon_labels))
  elif name == SCHEDULE_FREE:
    parts.append(schedule_free_adamw(schedule, wd))
  elif name == "lion":
    parts.append(optax.lion(schedule, weight_decay=wd, mask=decay_mask))
  else:
    raise errors.ConfigError(f"config.optimizer={name!r} is invalid: expected one of "
                             f"{', '.join(repr(o) for o in OPTIMIZERS)}.")
  return optax.chain(*parts)


def _schedule_free_state(opt_state: Any) -> optax.contrib.ScheduleFreeState:
  """The `b1` and `z` of the ScheduleFreeState inside `opt_state` (the live state, or the
  nested dicts of a checkpoint read back without a target), in a ScheduleFreeState."""
  found = []
  def visit(node):
    if isinstance(node, optax.contrib.ScheduleFreeState):
      found.append((node.b1, node.z))
    elif isinstance(node, Mapping) and "b1" in node and "z" in node:
      found.append((node["b1"], node["z"]))
    elif isinstance(node, Mapping):
      for value in node.values():
        visit(value)
    elif isinstance(node, (tuple, list)):
      for value in node:
        visit(value)
  visit(opt_state)
  if len(found) != 1:
    raise errors.CheckpointError(f"Expected one schedule-free optimizer state, found {len(found)}: was "
                     "this state trained with optimizer='schedule_free_adamw'?")
  b1, z = found[0]
  empty = dict.fromkeys(optax.contrib.ScheduleFreeState._fields)
  return optax.contrib.ScheduleFreeState(**{**empty, "b1": b1, "z": z})


# Jitted: eagerly, the Python constants of the formula would be host-to-device transfers,
# which the training loop's jax.transfer_guard("disallow") refuses.
_schedule_free_eval_params = jax.jit(optax.contrib.schedule_free_eval_params)


def eval_params(config: Config, opt_state: Any, params: Any) -> Any:
  """The parameters to evaluate and export: for schedule_free_adamw its averaged sequence x
  (optax.contrib.schedule_free_eval_params; `params` are its gradient points y), else
  `params` itself. `opt_state` may be the live state or one restored without a target."""
  if config.optimizer != SCHEDULE_FREE:
    return params
  return _schedule_free_eval_params(_schedule_free_state(opt_state), params)
