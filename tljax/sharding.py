"""The 1-D data-parallel mesh: state replicated, batches split along ``data``.

The mesh spans every process's devices. Host values become global arrays through
``put``, where each process fills only its own devices from the same host value.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A mesh over every device (of every process), one axis named ``data``."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """Splits the axis after ``leading_dims`` unsplit axes over ``data``."""
  return NamedSharding(mesh, P(*([None] * leading_dims), DATA_AXIS))


def put(tree, sharding: NamedSharding):
  """Host (or single-device) arrays, equal on every process, as global arrays on ``sharding``.

  Each process copies only the slices its own devices hold; no data crosses processes.
  """
  def one(value):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(one, tree)


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "batch_size") -> None:
  """The global batch must split evenly over the data axis."""
  devices = mesh.shape[DATA_AXIS]
  if batch_size <= 0 or batch_size % devices:
    lower = max(devices, batch_size // devices * devices)
    raise ValueError(f"{key}={batch_size} must be a positive multiple of the {devices} "
                     f"devices in the data mesh; use e.g. --config.{key}={lower} or "
                     f"{lower + devices}.")
