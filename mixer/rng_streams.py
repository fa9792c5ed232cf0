"""Independent random streams, each a pure function of (seed, stream[, index]).

Every use of randomness draws from its own stream, so that no two uses can share a key:
init, the epoch order (indexed by epoch), augmentation and dropout/stochastic depth
(indexed by step). Changing how one stream is consumed never shifts another.
"""
from __future__ import annotations

import jax

INIT, EPOCH_ORDER, AUGMENT, DROPOUT = "init", "epoch_order", "augment", "dropout"
_IDS = {INIT: 1, EPOCH_ORDER: 2, AUGMENT: 3, DROPOUT: 4}


def key(seed: int, stream: str, index: jax.Array | int | None = None) -> jax.Array:
  """The key of `stream` for `seed`, folded with `index` (a step or an epoch) when given."""
  k = jax.random.fold_in(jax.random.key(seed), _IDS[stream])
  return k if index is None else jax.random.fold_in(k, index)
