"""`config.init_from`: a run's starting parameters from a published .npz or timm .safetensors
file, checked against `config.model` and adapted (head, token count), replicated on the mesh."""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mixer import errors, models, parallel, pretrained
from mixer import workdir as layout


def load_params(config: ml_collections.ConfigDict, model: models.MlpMixer,
                mesh: jax.sharding.Mesh) -> Any:
  """Parameters from `config.init_from` (.npz or timm .safetensors), checked and adapted."""
  template = jax.eval_shape(lambda: models.init_params(model, config.image_size, config.seed))
  num_tokens = (config.image_size // model.patch_size) ** 2
  try:
    params = pretrained.load_pretrained(config.init_from, template, num_tokens=num_tokens)
  except ValueError as e:
    raise errors.ConfigError(
        f"config.init_from={config.init_from!r} does not fit config.model "
        f"({config.model.variant} at image_size {config.image_size}): {e}") from None
  logging.info("Initialised from %s.", config.init_from)
  return jax.tree.map(lambda x: parallel.put_replicated(np.asarray(x), mesh), params)


def params_for_new_run(config: ml_collections.ConfigDict, workdir: str, num_classes: int,
                       mesh: jax.sharding.Mesh) -> Any:
  """config.init_from's parameters, loaded and checked before the workdir is created (a bad
  file creates nothing); None without init_from or when the run has checkpoints to resume."""
  ckpt_dir = layout.path(workdir, layout.CHECKPOINT_DIR)
  if not config.init_from or (os.path.isdir(ckpt_dir) and any(
      name.isdigit() for name in os.listdir(ckpt_dir))):
    return None
  return load_params(config, models.build_model(config, num_classes), mesh)
