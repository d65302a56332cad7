"""Where a phase's batches come from, and in which order.

The same compiled step reads both kinds of source: batch ``i`` of a dispatch is
``inputs[indices[i]]``, rows gathered on the device (:class:`DeviceSource`, a split held in
device memory) or the batch itself (:class:`StreamSource`, a split read from its decoded
cache, whose ``indices`` are the step numbers). An epoch's order is made on the host
(:func:`epoch_order`), where the sources cut it into dispatches.
"""

import concurrent.futures
from collections.abc import Mapping

import jax
import numpy as np

from tljax import sharding
from tljax.data.dataset import RowView, Split


def _host_device():
  """The CPU device, where the batch order is made (None where JAX has no CPU backend)."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return None


def epoch_order(seed: int, phase: int, epoch: int, n: int, steps: int,
                batch_size: int) -> np.ndarray:
  """The example indices of the ``steps`` batches of ``epoch`` in ``phase``: int32
  [steps, batch_size], the first ``steps * batch_size`` of a permutation of ``range(n)``.
  A function of its arguments only, so a resumed run recomputes it."""
  with jax.default_device(_host_device()):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), phase), epoch)
    order = np.asarray(jax.random.permutation(key, n), np.int32)
  return order[:steps * batch_size].reshape(steps, batch_size)


def index_batches(n: int, batch: int, mesh):
  """Yields ``(indices, valid mask)`` device batches covering ``range(n)``, the last padded."""
  for start in range(0, n, batch):
    indices = np.arange(start, start + batch)
    valid = indices < n
    yield sharding.put((np.where(valid, indices, 0).astype(np.int32), valid),
                       sharding.batch_sharded(mesh))


def gather(tree, indices):
  """The rows ``indices`` of every array in ``tree``."""
  return jax.tree.map(lambda a: a[indices], tree)


class DeviceSource:
  """A split held in device memory (replicated): a batch is its rows ``indices``, gathered on
  the device inside the step."""

  def __init__(self, inputs: Mapping[str, jax.Array], labels: jax.Array, mesh):
    self.inputs, self.labels, self.mesh = inputs, labels, mesh

  @classmethod
  def of(cls, split: Split, mesh) -> "DeviceSource":
    replicated = sharding.replicated(mesh)
    return cls(sharding.put({"images": np.asarray(split.images)}, replicated),
               sharding.put(split.labels, replicated), mesh)

  def __len__(self) -> int:
    return self.labels.shape[0]

  def train_batches(self, order_KB: np.ndarray):
    """``(inputs, labels, indices[K, B])`` for the K batches of example indices ``order_KB``."""
    return self.inputs, self.labels, sharding.put(order_KB, sharding.batch_sharded(self.mesh, 1))

  def prefetch(self, order_KB: np.ndarray) -> None:
    """Nothing to do: the split is on the device already."""

  def eval_batches(self, batch: int):
    """``(inputs, labels, indices, mask)`` per batch of ``batch`` covering the split in order,
    the last padded (``mask`` False there)."""
    for indices, mask in index_batches(len(self), batch, self.mesh):
      yield self.inputs, self.labels, indices, mask


class StreamSource:
  """A split read from its memory-mapped decoded cache batch by batch, for datasets larger than
  memory. A dispatch's K batches go to the devices as ``images[K, B, ...]``, split over the
  devices along B, so each process reads from the cache only the rows of its own devices (the
  next dispatch's in a background thread while the devices run this one). The step takes
  batch ``i`` as ``inputs[i]``: its ``indices`` are the step numbers."""

  def __init__(self, split: Split, mesh):
    self.split, self.mesh = split, mesh
    self.labels = sharding.put(split.labels, sharding.replicated(mesh))  # Small: on device.
    self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stream")
    self._next: tuple[bytes, concurrent.futures.Future] | None = None

  def __len__(self) -> int:
    return len(self.split)

  @property
  def _sharding(self):
    """A dispatch's ``[K, B, ...]`` split over the devices along B."""
    return sharding.batch_sharded(self.mesh, 1)

  def _read_local(self, rows_KB: np.ndarray) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """The images and labels of ``rows_KB`` that this process's devices hold, by their index."""
    blocks = {}
    for index in self._sharding.addressable_devices_indices_map(rows_KB.shape).values():
      key = _index_key(index)
      if key not in blocks:
        rows = rows_KB[index]
        blocks[key] = np.asarray(self.split.images[rows]), self.split.labels[rows]
    return blocks

  def _put(self, rows_KB: np.ndarray, blocks=None):
    """``({"images": [K, B, ...]}, labels [K, B])`` of ``rows_KB`` on the devices."""
    blocks = self._read_local(rows_KB) if blocks is None else blocks
    images = jax.make_array_from_callback(
        rows_KB.shape + self.split.images.shape[1:], self._sharding,
        lambda index: blocks[_index_key(index[:2])][0])
    labels = jax.make_array_from_callback(rows_KB.shape, self._sharding,
                                          lambda index: blocks[_index_key(index)][1])
    return {"images": images}, labels

  def prefetch(self, order_KB: np.ndarray) -> None:
    """Starts reading this process's rows of ``order_KB`` in the background."""
    self._next = (order_KB.tobytes(), self._reader.submit(self._read_local, order_KB))

  def train_batches(self, order_KB: np.ndarray):
    """``(inputs, labels, steps[K])``: the examples of ``order_KB`` (as prefetched, where they
    were)."""
    blocks = None
    if self._next is not None and self._next[0] == order_KB.tobytes():
      blocks = self._next[1].result()
    self._next = None
    steps = np.arange(order_KB.shape[0], dtype=np.int32)
    return (*self._put(order_KB, blocks),
            sharding.put(steps, sharding.replicated(self.mesh)))

  def eval_batches(self, batch: int):
    """As ``DeviceSource.eval_batches``: each batch's rows, read from the cache, as a dispatch
    of one step (``indices`` 0)."""
    n = len(self)
    step = sharding.put(np.int32(0), sharding.replicated(self.mesh))
    for start in range(0, n, batch):
      rows = np.minimum(np.arange(start, start + batch), n - 1)
      mask = sharding.put(np.arange(start, start + batch) < n, sharding.batch_sharded(self.mesh))
      yield (*self._put(rows[None]), step, mask)


def _index_key(index: tuple[slice, ...]) -> tuple:
  """A device's slice of an array (``slice`` is not hashable before Python 3.12)."""
  return tuple((s.start, s.stop, s.step) for s in index)


def sources(splits: Mapping[str, Split], mesh) -> dict[str, DeviceSource | StreamSource]:
  """Each split as a source: on the device, or streamed where its images are a ``RowView`` of
  a decoded cache too large for memory (``data.stream``)."""
  return {name: (StreamSource(split, mesh) if isinstance(split.images, RowView)
                 else DeviceSource.of(split, mesh)) for name, split in splits.items()}
