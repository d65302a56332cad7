"""Which dataset a config names, and the train / validation / test splits it cuts.

``data.source`` picks the reader: ``folder`` (class folders of photos), ``idx`` (the four IDX
files), ``tfds`` (tensorflow-datasets) or ``auto`` (a folder of class folders, else IDX files,
else a tfds data_dir; without ``data.dir``, MNIST and Fashion-MNIST as downloaded IDX files).
"""

import pathlib

from tljax import distributed
from tljax.data import folder, idx, tfds
from tljax.data.dataset import Dataset, DataError, Split, holdout_split, take


def idx_or_tfds(name: str, data_dir: str | pathlib.Path | None, *, test_split: float = 0.0,
                seed: int = 0) -> Dataset:
  """Loads ``name`` from ``data_dir``: an IDX folder, else a tfds data_dir (a tfds dataset
  without a test split: ``test_split`` of train cut off as one, seeded by ``seed``).

  Without a ``data_dir``, MNIST and Fashion-MNIST come as their IDX files, downloaded once
  into the cache (``idx.fetch_idx``); other names from tfds's default data_dir.
  """
  if data_dir is None:
    if name in idx.IDX_SOURCES:
      return idx.load_idx_folder(idx.fetch_idx(name), name)
    return tfds.load_tfds(name, None, test_split=test_split, seed=seed)
  root = pathlib.Path(data_dir)
  if not str(data_dir) or not root.is_dir():
    raise DataError(f"data_dir {str(data_dir)!r} is not a folder. Give a folder holding the "
                    f"four IDX files ({', '.join(idx.IDX_FILES)}, .gz or plain), a tfds "
                    "data_dir, or no data_dir for tfds's default (~/tensorflow_datasets).")
  try:
    holds_idx = any(idx.find_idx_file(root, stem) for stem in idx.IDX_FILES)
  except OSError as e:
    raise DataError(f"data_dir {str(data_dir)!r} cannot be read ({e.strerror or e}); check its "
                    "permissions.") from None
  if holds_idx:
    return idx.load_idx_folder(root, name)  # Names the missing files if not all four are there.
  return tfds.load_tfds(name, root, test_split=test_split, seed=seed)


def load_dataset(config, workdir: pathlib.Path | None = None) -> Dataset:
  """The dataset ``config.data`` names, from the source it names or detects (``auto``: a
  folder of class folders, else IDX files or a tfds data_dir). A folder's split lists are
  read from ``<workdir>/splits`` where an earlier run wrote them, and a workdir inside the
  folder is left out of its scan."""
  source, data_dir = config.data.source, config.data.dir
  if source == "auto" and data_dir and folder.is_image_folder(data_dir):
    source = "folder"
  if source == "folder":
    if not data_dir:
      raise DataError("data.source=folder needs --config.data.dir=<folder of class "
                      "folders>.")
    size = folder.stored_size(config.data.image_size, config.model.input_size)
    return folder.load_folder(config.data, stored_size=size, seed=config.seed,
                              splits_dir=workdir / "splits" if workdir else None,
                              progress=distributed.is_main_process(), workdir=workdir)
  if source == "idx":
    return idx.load_idx_folder(data_dir, config.data.name)
  cut = {"test_split": config.data.test_split, "seed": config.seed}
  if source == "tfds":
    return tfds.load_tfds(config.data.name, data_dir or None, **cut)
  return idx_or_tfds(config.data.name, data_dir or None, **cut)


def load_splits(config, workdir: pathlib.Path | None = None
                ) -> tuple[Dataset, dict[str, Split]]:
  """The dataset, and its train / validation / test splits as this config cuts them: a
  folder's own validation split, else Keras's holdout of the last fraction of train.

  Every process loads the whole (in-memory) dataset; process 0 first, so that a download
  or a decoded cache in shared storage is made once.
  """
  with distributed.main_process_first("loading the dataset", config.distributed.timeout_s):
    dataset = load_dataset(config, workdir)
  train = take(dataset.train, config.data.train_examples)
  if dataset.validation is None:
    train, validation = holdout_split(train, config.data.validation_split)
  else:
    validation = dataset.validation
  return dataset, {"train": train, "validation": validation, "test": dataset.test}
