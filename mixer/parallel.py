"""The device mesh and shardings: one `data` axis over every device of every process."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mixer import errors

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices (all processes); the batch is split along it.

  jax.make_mesh orders the devices by the physical topology (a ring on TPU, so collectives
  take neighbouring links); 'Auto' axis types let XLA propagate shardings from our
  annotations, as Mesh() did.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """Shards axis `leading_dims` (the batch axis) along `data`."""
  return NamedSharding(mesh, P(*([None] * leading_dims), DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  devices = mesh.devices.size
  if batch_size % devices:
    raise errors.ConfigError(
        f"config.{what}={batch_size} is not divisible by the number of devices ({devices}, "
        f"over {jax.process_count()} process(es)); pick a multiple of {devices}.")


def put_replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array copied to every device; works with several processes (each holds it all)."""
  sharding = replicated(mesh)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
