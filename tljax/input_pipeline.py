"""Data for a run: the dataset and its splits, and what the model reads of one batch.

Splits live on the device (``sharding.put``); a step gathers its batch by index inside the jitted
step (``gather``) and turns the stored uint8 images into model input (``model_inputs``):
augmented where the phase augments, else the evaluation view; or, past a cached frozen prefix,
the cached tensors themselves.
"""

import pathlib
from collections.abc import Mapping

import jax
import numpy as np

from tljax import data, distributed, folder, sharding


def load_dataset(config, workdir: pathlib.Path | None = None) -> data.Dataset:
  """The dataset ``config.data`` names, from the source it names or detects (``auto``: a
  folder of class folders, else IDX files or a tfds data_dir). A folder's split lists go to
  ``<workdir>/splits``."""
  source, data_dir = config.data.source, config.data.dir
  if source == "auto" and data_dir and folder.is_image_folder(data_dir):
    source = "folder"
  if source == "folder":
    if not data_dir:
      raise data.DataError("data.source=folder needs --config.data.dir=<folder of class "
                           "folders>.")
    return folder.load_folder(config, workdir / "splits" if workdir else None,
                              write_splits=distributed.is_main_process(),
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


def to_device(splits: Mapping[str, data.Split], mesh) -> tuple[dict, dict]:
  """Each split's ``{"images": uint8}`` and labels, replicated over ``mesh``."""
  replicated = sharding.replicated(mesh)
  return ({k: sharding.put({"images": s.images}, replicated) for k, s in splits.items()},
          {k: sharding.put(s.labels, replicated) for k, s in splits.items()})
