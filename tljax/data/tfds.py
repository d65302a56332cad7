"""tensorflow-datasets, read through its random-access data source (``builder.as_data_source``;
no TensorFlow needed to read). A dataset not prepared yet is downloaded and prepared in
ArrayRecord format on first use, or the call fails at once when offline or when preparing it
needs TensorFlow."""

import difflib
import importlib.util
import logging
import pathlib
import re
import socket

import numpy as np

from tljax.data.dataset import Dataset, DataError, Split
from tljax.data.idx import IDX_CLASS_NAMES, IDX_FILES, IDX_SOURCES

# Probed before a tfds download: it serves tfds's dataset mirror.
DOWNLOAD_HOST = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 3.0
_TFDS_EXAMPLES = ("mnist", "fashion_mnist", "kmnist", "emnist", "cifar10", "cifar100",
                  "svhn_cropped")


def host_reachable(host: str, port: int) -> bool:
  """Whether a TCP connection to ``host:port`` opens within a few seconds."""
  try:
    with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
      return True
  except OSError:
    return False


def _tfds_builder(name: str, data_dir: str | pathlib.Path | None):
  import tensorflow_datasets as tfds  # Imported on use: it takes a while.
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.DatasetNotFoundError:
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(name, known, n=5)
    raise DataError(f"Unknown dataset {name!r}: tensorflow-datasets has no such builder"
                    + (f"; did you mean {', '.join(close)}?" if close else ".")
                    + f" Image-classification datasets include {', '.join(_TFDS_EXAMPLES)} "
                    f"(all {len(known)}: tfds.list_builders()).") from None
  features = builder.info.features
  if not {"image", "label"} <= set(features.keys()):
    raise DataError(f"{name}: expected an image-classification dataset with features 'image' "
                    f"and 'label', found {sorted(features.keys())}.")
  return builder


def _local_options(name: str) -> str:
  """The --config.data.dir values that work without a network, for the error messages."""
  idx = (f"--config.data.dir=<folder with the four IDX files {', '.join(IDX_FILES)} (.gz)>, or "
         if name in IDX_CLASS_NAMES else "")
  return (f"{idx}--config.data.dir=<a tfds data_dir holding {name} prepared with "
          "file_format='array_record'>")


def needs_tensorflow_to_prepare(builder) -> bool:
  """Whether preparing ``builder`` needs TensorFlow, which is not installed.

  tensorflow-datasets reads a prepared dataset without TensorFlow but prepares none of its own
  image-classification datasets without it (all 75 in 4.9.10, tried with fake downloads; see
  docs/data.md): it opens downloaded archives with ``tf.io.gfile``, most builders read their
  files with it, and it encodes NumPy images with ``tf.image``. Any other builder is tried; a
  failed TensorFlow import while preparing it gives the same message.
  """
  if importlib.util.find_spec("tensorflow") is not None:
    return False
  return type(builder).__module__.startswith("tensorflow_datasets.")


def _failed_tensorflow_import(error: BaseException | None) -> bool:
  """Whether ``error``, or one it was raised from, is a failed import of TensorFlow.

  tensorflow-datasets wraps it: in an ``ExtractError``, or as ``ModuleNotFoundError("Failed
  to encode example: ...")`` with ``name`` None.
  """
  while error is not None:
    if (isinstance(error, ImportError)
        and re.search(r"\btensorflow\b", f"{error.name} {error}") is not None):
      return True
    error = error.__cause__ or error.__context__
  return False


def _needs_tensorflow_message(builder, name: str) -> str:
  idx = (f" Or leave data.dir empty: tljax downloads {name}'s IDX files itself."
         if name in IDX_SOURCES else "")
  return (f"{name} is not prepared in {builder.data_path}, and tensorflow-datasets needs "
          "TensorFlow to prepare it, which is not installed. Install it (pip install "
          f"tensorflow-cpu, or pip install -e '.[tfds]'), or pass {_local_options(name)}.{idx}")


def _download_and_prepare(builder, name: str) -> None:
  if needs_tensorflow_to_prepare(builder):
    raise DataError(_needs_tensorflow_message(builder, name))
  host, port = DOWNLOAD_HOST
  if not host_reachable(host, port):
    raise DataError(f"{name} is not prepared in {builder.data_path}, and it cannot be "
                    f"downloaded: the download host {host} could not be reached. "
                    f"To run offline, pass {_local_options(name)}.")
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception as e:  # tfds wraps a failed TensorFlow import in other errors.
    if _failed_tensorflow_import(e):
      raise DataError(_needs_tensorflow_message(builder, name)) from None
    if not isinstance(e, OSError):
      raise
    raise DataError(f"{name} is not prepared in {builder.data_path}, and downloading it "
                    f"failed: {e}. To run offline, pass {_local_options(name)}.") from e


def _to_split(source, name: str) -> Split:
  images, labels = [], []
  for example in source:
    images.append(example["image"])
    labels.append(example["label"])
  shapes = {image.shape for image in images}
  if len(shapes) > 1:
    raise DataError(f"{name}: images come in {len(shapes)} sizes (e.g. {sorted(shapes)[:3]}); "
                    "only datasets of one image size are supported.")
  images = np.stack(images).astype(np.uint8, copy=False)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  return Split(images, np.asarray(labels, np.int32))


def cut_test(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
  """``(train, test)``: of each class's n examples, ``n * fraction`` rounded half up (at
  least one left in train) go to test, chosen by a permutation seeded by ``seed`` and the
  class, as a folder without test/ is cut; both keep the examples' order."""
  in_test = np.zeros(len(train.labels), bool)
  for label in np.unique(train.labels):
    rows = np.flatnonzero(train.labels == label)
    count = min(int(len(rows) * fraction + 0.5), len(rows) - 1)
    in_test[rows[np.random.default_rng([seed, int(label)]).permutation(len(rows))[:count]]] = True
  return (Split(train.images[~in_test], train.labels[~in_test]),
          Split(train.images[in_test], train.labels[in_test]))


def load_tfds(name: str, data_dir: str | pathlib.Path | None, *, test_split: float = 0.0,
              seed: int = 0) -> Dataset:
  """Loads the train and test splits of tfds dataset ``name`` into NumPy; a dataset without
  a test split has ``test_split`` of train cut off as its test split (``cut_test``), or is
  refused where ``test_split`` is 0.

  Reads the copy prepared in ``data_dir`` (tfds's default folder if None); without one, and
  with the download host reachable, downloads and prepares it first (ArrayRecord format).
  Offline, fails at once with a message saying how to run from local files.
  """
  builder = _tfds_builder(name, data_dir)
  if not builder.is_prepared():
    _download_and_prepare(builder, name)
  names = _split_names(builder, name, test_split)
  try:
    sources = builder.as_data_source(split=names)
  except NotImplementedError:
    raise DataError(f"{name} is prepared in {builder.data_path} in a format that needs "
                    "TensorFlow to read. Prepare it with file_format='array_record' in another "
                    f"data_dir, or pass {_local_options(name)}.") from None
  except (KeyError, ValueError) as e:
    raise DataError(f"{name}: cannot open its {' and '.join(names)} splits in "
                    f"{builder.data_path}: {e}") from None
  class_names = tuple(builder.info.features["label"].names)
  train, *test = (_to_split(source, name) for source in sources)
  cut = ""
  if test:
    test = test[0]
  else:
    train, test = cut_test(train, test_split, seed)
    cut = f" (test cut from train at {test_split}, seed {seed})"
    logging.info("%s has no test split: %d of its %d training images are the test split "
                 "(data.test_split=%s, seeded)", name, len(test), len(train) + len(test),
                 test_split)
  identity = f"tfds {name} {builder.info.version} train={len(train)} test={len(test)}{cut}"
  return Dataset(train, test, len(class_names), class_names, name, identity=identity)


def _split_names(builder, name: str, test_split: float) -> list[str]:
  """The splits to read: train and test, or train alone where the dataset has no test split
  and ``test_split`` cuts one; DataError names the splits it has otherwise."""
  available = sorted(builder.info.splits.keys())
  if not available:  # Not recorded (tfds.testing.mock_data): opening them tells.
    return ["train", "test"]
  if "train" not in available or ("test" not in available and not test_split):
    raise DataError(f"{name} has the splits {available}; tljax trains on 'train' and tests on "
                    "'test'" + ("" if "train" not in available else
                                ", or on data.test_split of train where there is no 'test': "
                                "set data.test_split > 0 (e.g. 0.1)") + ".")
  return ["train", "test"] if "test" in available else ["train"]
