"""Data for a run: the dataset and its splits, and what the model reads of one batch.

Splits live on the device (``sharding.put``); a step gathers its batch by index inside the jitted
step (``gather``) and turns the stored uint8 images into model input (``model_inputs``):
augmented where the phase augments, else the evaluation view; or, past a cached frozen prefix,
the cached tensors themselves.
"""

import concurrent.futures
import pathlib
from collections.abc import Mapping

import jax
import numpy as np

from tljax import data, distributed, folder, sharding


def load_dataset(config, workdir: pathlib.Path | None = None) -> data.Dataset:
  """The dataset ``config.data`` names, from the source it names or detects (``auto``: a
  folder of class folders, else IDX files or a tfds data_dir). A folder's split lists are
  read from ``<workdir>/splits`` where an earlier run wrote them."""
  source, data_dir = config.data.source, config.data.dir
  if source == "auto" and data_dir and folder.is_image_folder(data_dir):
    source = "folder"
  if source == "folder":
    if not data_dir:
      raise data.DataError("data.source=folder needs --config.data.dir=<folder of class "
                           "folders>.")
    return folder.load_folder(config, workdir / "splits" if workdir else None,
                              progress=distributed.is_main_process())
  if source == "idx":
    return data.load_idx_folder(data_dir, config.data.name)
  if source == "tfds":
    return data.load_tfds(config.data.name, data_dir or None)
  return data.load_dataset(config.data.name, data_dir or None)


def load_splits(config, workdir: pathlib.Path | None = None
                ) -> tuple[data.Dataset, dict[str, data.Split]]:
  """The dataset, and its train / validation / test splits as this config cuts them: a
  folder's own validation split, else Keras's holdout of the last fraction of train.

  Every process loads the whole (in-memory) dataset; process 0 first, so that a download
  or a decoded cache in shared storage is made once.
  """
  with distributed.main_process_first("dataset"):
    dataset = load_dataset(config, workdir)
  train = data.take(dataset.train, config.data.train_examples)
  if dataset.validation is None:
    train, validation = data.holdout_split(train, config.data.validation_split)
  else:
    validation = dataset.validation
  return dataset, {"train": train, "validation": validation, "test": dataset.test}


def model_inputs(batch: Mapping[str, jax.Array], rng: jax.Array, *, cut: int, size: int,
                 scale: str, crop_fraction: float, augmentation: data.Augmentation):
  """What the model reads at layer ``cut`` for one gathered batch."""
  if cut:
    return dict(batch)
  if augmentation.active:
    return data.training_input(rng, batch["images"], size=size, scale=scale,
                               crop_fraction=crop_fraction, augmentation=augmentation)
  return data.evaluation_input(batch["images"], size=size, scale=scale,
                               crop_fraction=crop_fraction)


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


# ---------------------------------------------------------------------------------------------
# Sources: where a phase's batches come from. The same compiled step reads both: batch ``i``
# of a dispatch is ``inputs[indices[i]]``, rows gathered on the device (DeviceSource) or the
# batch itself (StreamSource, whose ``indices`` are the step numbers).
# ---------------------------------------------------------------------------------------------


class DeviceSource:
  """A split held in device memory (replicated): a batch is its rows ``indices``, gathered on
  the device inside the step."""

  def __init__(self, inputs: Mapping[str, jax.Array], labels: jax.Array, mesh):
    self.inputs, self.labels, self.mesh = inputs, labels, mesh

  @classmethod
  def of(cls, split: data.Split, mesh) -> "DeviceSource":
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

  def __init__(self, split: data.Split, mesh):
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


def sources(splits: Mapping[str, data.Split], mesh) -> dict[str, "DeviceSource | StreamSource"]:
  """Each split as a source: on the device, or streamed where its images are a ``RowView`` of
  a decoded cache too large for memory (``data.stream``)."""
  return {name: (StreamSource(split, mesh) if isinstance(split.images, data.RowView)
                 else DeviceSource.of(split, mesh)) for name, split in splits.items()}
