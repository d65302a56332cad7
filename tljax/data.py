"""Datasets on the host (IDX folders, tensorflow-datasets) and jittable preprocessing.

A dataset is loaded whole into NumPy (:class:`Dataset`: uint8 images, int32 labels), cut into
train / validation the way Keras's ``model.fit(validation_split=...)`` does
(:func:`holdout_split`), and kept on device; each step gathers a batch with
:func:`epoch_permutation` and turns it into model input inside the jitted step with
:func:`preprocess` and :func:`augment`.

Two sources, chosen by :func:`load_dataset`:

* a folder holding the four classic IDX files (``train-images-idx3-ubyte.gz``, ...), as
  published for MNIST and Fashion-MNIST; works offline. Without a folder, those two datasets
  are downloaded as IDX files into the cache (:func:`fetch_idx`);
* tensorflow-datasets, read through its random-access data source (``builder.as_data_source``,
  what ``tfds.data_source`` returns; no TensorFlow needed); the dataset is downloaded and
  prepared in ArrayRecord format on first use, or the call fails at once when offline.
"""

import dataclasses
import difflib
import gzip
import importlib.util
import hashlib
import math
import os
import pathlib
import re
import socket
import struct
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tljax import download
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_FIX = ("Re-download it; an IDX dataset folder holds the four files "
            + ", ".join(f"{stem}.gz" for stem in IDX_FILES) + " (or the same names unzipped).")
_IDX_MAGIC = {0x00000801: (1, "uint8 labels, 1-D"), 0x00000803: (3, "uint8 images, 3-D")}

IDX_CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}
# The IDX datasets tljax downloads itself (tfds needs TensorFlow to prepare them): the
# addresses and sha256 tensorflow-datasets uses, in IDX_FILES order.
IDX_SOURCES = {
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/", (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", (
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")),
}
# A mirror of the IDX files: <mirror>/<dataset name>/<file>.
DATA_MIRROR_ENV = "TLJAX_DATA_MIRROR"
# Probed before a tfds download: it serves tfds's dataset mirror.
DOWNLOAD_HOST = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 3.0
_TFDS_EXAMPLES = ("mnist", "fashion_mnist", "kmnist", "emnist", "cifar10", "cifar100",
                  "svhn_cropped")
SCALES = {"unit": (255.0, 0.0),        # (divisor, offset): the tutorial's x / 255,
          "symmetric": (127.5, -1.0)}  # MobileNetV2's preprocess_input: x / 127.5 - 1.


class DataError(ValueError):
  """A dataset is missing, malformed or cannot be fetched; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------------


class RowView:
  """Rows ``rows`` of a (memory-mapped) uint8 image array, read only when indexed: the images
  of a split too large to hold in memory. Slicing gives a RowView; an index array or an int
  reads those rows into memory."""

  def __init__(self, source: np.ndarray, rows: np.ndarray):
    self.source, self.rows = source, np.asarray(rows, np.int64)

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.rows), *self.source.shape[1:])

  @property
  def dtype(self) -> np.dtype:
    return self.source.dtype

  @property
  def ndim(self) -> int:
    return self.source.ndim

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return RowView(self.source, self.rows[index])
    return np.asarray(self.source[self.rows[index]])


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Examples of one split: ``images`` uint8 [N, H, W] (grey) or [N, H, W, C] (an array, or a
  ``RowView`` of a decoded cache to stream), ``labels`` int32 [N]."""
  images: np.ndarray | RowView
  labels: np.ndarray

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
      raise ValueError(f"Split images must be uint8 [N,H,W] or [N,H,W,C], got "
                       f"{self.images.dtype} {self.images.shape}.")
    if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
      raise ValueError(f"Split labels must be int32 [{self.images.shape[0]}] to match the "
                       f"images, got {self.labels.dtype} {self.labels.shape}.")

  def __len__(self) -> int:
    return self.labels.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train and a test split with their class names; a validation split where the source
  has its own (a folder dataset), else None (cut from train by :func:`holdout_split`).

  ``identity`` says which data this is, so that a checkpoint is not resumed on other data
  (it is part of the checkpoint fingerprint): a digest of the content, or of what stands for
  it (a file list with sizes and modification times; a tfds name, version and split sizes).
  """
  train: Split
  test: Split
  num_classes: int
  class_names: tuple[str, ...]
  name: str
  identity: str
  validation: Split | None = None
  skipped: tuple[str, ...] = ()  # Files left out because they could not be read.
  # A folder dataset's files of each split (relative to its root), for <workdir>/splits.
  split_files: Mapping[str, tuple[str, ...]] | None = None

  def __post_init__(self):
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"{self.name}: {len(self.class_names)} class names for "
                       f"num_classes={self.num_classes}.")


def _slice(split: Split, start: int, stop: int) -> Split:
  return Split(split.images[start:stop], split.labels[start:stop])


# ---------------------------------------------------------------------------------------------
# IDX files.
# ---------------------------------------------------------------------------------------------


def unreadable(path: str | os.PathLike, error: OSError) -> DataError:
  """A file or folder that is there but cannot be read (permissions, storage gone)."""
  return DataError(f"{path}: cannot be read ({error.strerror or error}); check its "
                   "permissions and that the storage holding it is reachable.")


def read_idx(path: str | pathlib.Path) -> np.ndarray:
  """Reads a uint8 IDX file (``.gz`` or plain): labels [N] or images [N, H, W]."""
  path = pathlib.Path(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise DataError(f"{path}: no such file. {_IDX_FIX}") from None
  except OSError as e:
    raise unreadable(path, e) from None
  try:
    if path.suffix == ".gz":
      data = gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: cannot be decompressed ({e}); the file is damaged or "
                    f"truncated. {_IDX_FIX}") from None
  magic = int.from_bytes(data[:4], "big")
  if len(data) < 4 or magic not in _IDX_MAGIC:
    expected = " or ".join(f"0x{m:08x} ({what})" for m, (_, what) in _IDX_MAGIC.items())
    hint = " It is gzip data: name it *.gz." if data[:2] == b"\x1f\x8b" else ""
    raise DataError(f"{path}: not a uint8 IDX file: expected magic number {expected}, found "
                    f"0x{data[:4].hex():0>8}.{hint} {_IDX_FIX}")
  ndim = _IDX_MAGIC[magic][0]
  offset = 4 + 4 * ndim
  if len(data) < offset:
    raise DataError(f"{path}: truncated IDX header: expected {offset} bytes, found "
                    f"{len(data)}. {_IDX_FIX}")
  dims = struct.unpack(f">{ndim}I", data[4:offset])
  expected_size, found_size = math.prod(dims), len(data) - offset
  if found_size != expected_size:
    raise DataError(f"{path}: header dims {dims} call for {expected_size} bytes of data, found "
                    f"{found_size} (truncated or corrupt). {_IDX_FIX}")
  return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def content_digest(*splits: Split) -> str:
  """The sha256 of the images and labels of ``splits``, with their shapes."""
  digest = hashlib.sha256()
  for split in splits:
    for array in (split.images, split.labels):
      digest.update(f"{array.dtype} {array.shape}\n".encode())
      digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def _find_idx_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
  return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def is_idx_folder(path: str | pathlib.Path) -> bool:
  """Whether ``path`` is a folder holding the four IDX files (each ``.gz`` or plain)."""
  folder = pathlib.Path(path)
  return folder.is_dir() and all(_find_idx_file(folder, stem) for stem in IDX_FILES)


def _idx_split(images_path: pathlib.Path, labels_path: pathlib.Path) -> Split:
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or labels.ndim != 1:
    raise DataError(f"{images_path} must hold images [N,H,W] and {labels_path} labels [N], "
                    f"found shapes {images.shape} and {labels.shape}. {_IDX_FIX}")
  if len(images) != len(labels):
    raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                    f"{len(labels)} labels; the files do not belong together. {_IDX_FIX}")
  return Split(images, labels.astype(np.int32))


def load_idx_folder(path: str | pathlib.Path, name: str) -> Dataset:
  """Loads the four IDX files in ``path``; ``name`` picks the class names.

  ``"mnist"`` and ``"fashion_mnist"`` get their published class names, any other name
  ``"0"``, ``"1"``, ... up to the largest label.
  """
  folder = pathlib.Path(path)
  files = {stem: _find_idx_file(folder, stem) for stem in IDX_FILES}
  missing = [stem for stem, p in files.items() if p is None]
  if missing:
    raise DataError(f"{folder}: missing IDX files {missing} (each .gz or plain). {_IDX_FIX}")
  train = _idx_split(files[IDX_FILES[0]], files[IDX_FILES[1]])
  test = _idx_split(files[IDX_FILES[2]], files[IDX_FILES[3]])
  max_label = int(max(train.labels.max(initial=0), test.labels.max(initial=0)))
  class_names = IDX_CLASS_NAMES.get(name, tuple(str(i) for i in range(max_label + 1)))
  if max_label >= len(class_names):
    raise DataError(f"{folder}: label {max_label} found, but {name} has {len(class_names)} "
                    "classes; is this the right dataset name for this folder?")
  return Dataset(train, test, len(class_names), class_names, name,
                 identity=f"idx sha256:{content_digest(train, test)}")


def idx_downloads(name: str) -> dict[str, tuple[str, str]]:
  """``{file name: (url, sha256)}`` of the four IDX files of ``name`` ("mnist" or
  "fashion_mnist"): from the addresses tensorflow-datasets uses, or from
  ``$TLJAX_DATA_MIRROR/<name>/`` where that names a mirror; checksums as tfds publishes them."""
  base_url, checksums = IDX_SOURCES[name]
  mirror = os.environ.get(DATA_MIRROR_ENV)
  base_url = f"{mirror.rstrip('/')}/{name}/" if mirror else base_url
  return {f"{stem}.gz": (base_url + f"{stem}.gz", sha256)
          for stem, sha256 in zip(IDX_FILES, checksums)}


def fetch_idx(name: str, cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
  """Downloads the four IDX files of ``name`` into ``<cache_dir>/datasets/<name>`` (once; each
  checked against its sha256) and returns that folder. ``cache_dir`` None: $TLJAX_CACHE or
  ~/.cache/tljax."""
  folder = (pathlib.Path(cache_dir) if cache_dir else download.default_cache_dir())
  folder = folder / "datasets" / name
  instead = (f"pass --config.data.dir=<folder with the four files "
             f"{', '.join(f'{stem}.gz' for stem in IDX_FILES)}>")
  for url, sha256 in idx_downloads(name).values():
    try:
      download.fetch(url, folder, sha256, what=f"{name} download", instead=instead)
    except download.DownloadError as e:
      raise DataError(str(e)) from None
  return folder


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets.
# ---------------------------------------------------------------------------------------------


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
  the README): it opens downloaded archives with ``tf.io.gfile``, most builders read their
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


def load_tfds(name: str, data_dir: str | pathlib.Path | None) -> Dataset:
  """Loads the train and test splits of tfds dataset ``name`` into NumPy.

  Reads the copy prepared in ``data_dir`` (tfds's default folder if None); without one, and
  with the download host reachable, downloads and prepares it first (ArrayRecord format).
  Offline, fails at once with a message saying how to run from local files.
  """
  builder = _tfds_builder(name, data_dir)
  if not builder.is_prepared():
    _download_and_prepare(builder, name)
  try:
    sources = builder.as_data_source(split=["train", "test"])
  except NotImplementedError:
    raise DataError(f"{name} is prepared in {builder.data_path} in a format that needs "
                    "TensorFlow to read. Prepare it with file_format='array_record' in another "
                    f"data_dir, or pass {_local_options(name)}.") from None
  except (KeyError, ValueError) as e:
    raise DataError(f"{name}: cannot open its train and test splits in {builder.data_path}: "
                    f"{e}") from None
  class_names = tuple(builder.info.features["label"].names)
  train, test = (_to_split(source, name) for source in sources)
  identity = f"tfds {name} {builder.info.version} train={len(train)} test={len(test)}"
  return Dataset(train, test, len(class_names), class_names, name, identity=identity)


def load_dataset(name: str, data_dir: str | pathlib.Path | None) -> Dataset:
  """Loads ``name`` from ``data_dir``: an IDX folder, else a tfds data_dir.

  Without a ``data_dir``, MNIST and Fashion-MNIST come as their IDX files, downloaded once
  into the cache (:func:`fetch_idx`); other names from tfds's default data_dir.
  """
  if data_dir is None:
    if name in IDX_SOURCES:
      return load_idx_folder(fetch_idx(name), name)
    return load_tfds(name, None)
  folder = pathlib.Path(data_dir)
  if not str(data_dir) or not folder.is_dir():
    raise DataError(f"data_dir {str(data_dir)!r} is not a folder. Give a folder holding the "
                    f"four IDX files ({', '.join(IDX_FILES)}, .gz or plain), a tfds data_dir, "
                    "or no data_dir for tfds's default (~/tensorflow_datasets).")
  try:
    holds_idx = any(_find_idx_file(folder, stem) for stem in IDX_FILES)
  except OSError as e:
    raise DataError(f"data_dir {str(data_dir)!r} cannot be read ({e.strerror or e}); check its "
                    "permissions.") from None
  if holds_idx:
    return load_idx_folder(folder, name)  # Names the missing files if not all four are there.
  return load_tfds(name, folder)


# ---------------------------------------------------------------------------------------------
# Cutting splits.
# ---------------------------------------------------------------------------------------------


def holdout_split(split: Split, fraction: float) -> tuple[Split, Split]:
  """Splits off the last ``fraction`` of ``split`` as validation, like Keras's
  ``model.fit(validation_split=fraction)`` (before any shuffling, same rounding).

  Example: 10 examples and fraction 0.25 give train = the first floor(10 * 0.75) = 7 and
  validation = the last 3. Fraction 0 gives ``(split, <empty split>)``.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation fraction {fraction} must be in [0, 1).")
  n = len(split)
  if fraction == 0.0:
    return split, _slice(split, n, n)
  split_at = int(math.floor(n * (1.0 - fraction)))
  if split_at in (0, n):
    raise ValueError(f"{n} examples are too few to hold out a validation fraction of "
                     f"{fraction}; use more examples or another fraction.")
  return _slice(split, 0, split_at), _slice(split, split_at, n)


def take(split: Split, n: int) -> Split:
  """The first ``n`` examples of ``split`` (all of them if ``n`` is 0 or exceeds its size)."""
  if n < 0:
    raise ValueError(f"take n={n} must be >= 0 (0 = all).")
  return _slice(split, 0, n) if n else split


# ---------------------------------------------------------------------------------------------
# On device: order, preprocessing, augmentation.
# ---------------------------------------------------------------------------------------------


def epoch_permutation(seed: int, phase: int, epoch: int, n: int) -> jax.Array:
  """The example order of ``epoch`` in ``phase``: int32 [n], a function of its arguments only,
  so a resumed run recomputes it."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), phase), epoch)
  return jax.random.permutation(key, n).astype(jnp.int32)


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
  """Batches per epoch over ``n`` examples; the last partial one counts unless dropped."""
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be > 0.")
  return n // batch_size if drop_remainder else -(-n // batch_size)


def preprocess(images: jax.Array, *, size: int, scale: str) -> jax.Array:
  """uint8 [B,H,W] or [B,H,W,C] (C 1 or 3) -> float32 [B,size,size,3] model input.

  Resizes like ``tf.image.resize(method="bilinear")`` (half-pixel centers, no antialiasing),
  repeats grey to RGB, then scales: ``"unit"`` x/255, ``"symmetric"`` x/127.5 - 1.
  """
  if scale not in SCALES:
    raise ValueError(f"Unknown scale {scale!r}; expected one of {sorted(SCALES)}.")
  x_NHWC = images.astype(jnp.float32)
  if x_NHWC.ndim == 3:
    x_NHWC = x_NHWC[..., None]
  b, h, w, c = x_NHWC.shape
  if c not in (1, 3):
    raise ValueError(f"preprocess expects 1 or 3 channels, got images of shape {images.shape}.")
  if (h, w) != (size, size):
    x_NHWC = jax.image.resize(x_NHWC, (b, size, size, c), method="bilinear", antialias=False)
  if c == 1:
    x_NHWC = jnp.repeat(x_NHWC, 3, axis=-1)
  divisor, offset = SCALES[scale]
  return x_NHWC / divisor + offset


def evaluation_input(images: jax.Array, *, size: int, scale: str,
                     crop_fraction: float = 1.0) -> jax.Array:
  """Stored uint8 images [B,H,W(,C)] -> float32 [B,size,size,3]: the model input of
  evaluation, prediction and unaugmented training.

  Takes the centre crop of ``crop_fraction`` of each side (1.0: the whole image), then
  :func:`preprocess` (bilinear resize, grey to RGB, scaling).
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1].")
  if crop_fraction < 1.0:
    h, w = images.shape[1:3]
    crop_h, crop_w = max(1, round(h * crop_fraction)), max(1, round(w * crop_fraction))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    images = images[:, top:top + crop_h, left:left + crop_w]
  return preprocess(images, size=size, scale=scale)


def _bilinear_weights(start: jax.Array, length: jax.Array, n_in: int, n_out: int) -> jax.Array:
  """[n_out, n_in] weights sampling ``[start, start + length)`` of an axis of ``n_in`` pixels
  at ``n_out`` evenly spaced points (half-pixel centres, clamped at the edges)."""
  centres = start + (jnp.arange(n_out) + 0.5) * (length / n_out) - 0.5
  centres = jnp.clip(centres, 0.0, n_in - 1.0)
  lower = jnp.floor(centres)
  frac = (centres - lower)[:, None]
  lower = lower.astype(jnp.int32)
  upper = jnp.minimum(lower + 1, n_in - 1)
  return (jax.nn.one_hot(lower, n_in) * (1.0 - frac) + jax.nn.one_hot(upper, n_in) * frac)


def random_resized_crop(rng: jax.Array, images: jax.Array, *, size: int,
                        scale_range: tuple[float, float],
                        ratio_range: tuple[float, float]) -> jax.Array:
  """uint8 [B,H,W(,C)] -> float32 [B,size,size,C] (pixel values, not yet scaled): each image's
  own random crop, resized (bilinear).

  A crop covers an area fraction drawn uniformly from ``scale_range`` with a width / height
  ratio drawn log-uniformly from ``ratio_range`` (each side clipped to the image), at a
  uniformly random position: Inception's and timm's ``RandomResizedCrop``.
  """
  x_NHWC = images.astype(jnp.float32)
  if x_NHWC.ndim == 3:
    x_NHWC = x_NHWC[..., None]
  b, h, w, _ = x_NHWC.shape
  k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
  area = jax.random.uniform(k_area, (b,), minval=scale_range[0], maxval=scale_range[1])
  ratio = jnp.exp(jax.random.uniform(k_ratio, (b,), minval=math.log(ratio_range[0]),
                                     maxval=math.log(ratio_range[1])))
  crop_h = jnp.clip(jnp.sqrt(area / ratio) * h, 1.0, h)
  crop_w = jnp.clip(jnp.sqrt(area * ratio) * w, 1.0, w)
  top = jax.random.uniform(k_top, (b,)) * (h - crop_h)
  left = jax.random.uniform(k_left, (b,)) * (w - crop_w)
  rows = jax.vmap(_bilinear_weights, (0, 0, None, None))(top, crop_h, h, size)
  cols = jax.vmap(_bilinear_weights, (0, 0, None, None))(left, crop_w, w, size)
  return jnp.einsum("boh,bhwc,bpw->bopc", rows, x_NHWC, cols)


def random_flip(rng: jax.Array, x_NHWC: jax.Array) -> jax.Array:
  """Mirrors each image of [B,H,W,C] left-right with probability 1/2."""
  flipped = jax.random.bernoulli(rng, 0.5, (x_NHWC.shape[0], 1, 1, 1))
  return jnp.where(flipped, x_NHWC[:, :, ::-1], x_NHWC)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Random changes to training images, made on device (see :func:`training_input`)."""
  shift: int = 0                                   # Translation of up to N pixels.
  crop_scale: tuple[float, float] | None = None    # Random resized crop; None = off.
  crop_ratio: tuple[float, float] = (0.75, 1.333)
  flip: bool = False

  @property
  def active(self) -> bool:
    return bool(self.shift or self.crop_scale or self.flip)

  @classmethod
  def from_config(cls, data_config) -> "Augmentation":
    """The augmentation the ``data`` section of a config asks for."""
    return cls(shift=data_config.augment_shift,
               crop_scale=tuple(data_config.crop_scale) if data_config.random_crop else None,
               crop_ratio=tuple(data_config.crop_ratio), flip=data_config.flip)


def training_input(rng: jax.Array, images: jax.Array, *, size: int, scale: str,
                   crop_fraction: float, augmentation: Augmentation) -> jax.Array:
  """Stored uint8 images -> augmented float32 [B,size,size,3] model input.

  A random resized crop (else the evaluation view, :func:`evaluation_input`), then a random
  flip, then a random shift, each where ``augmentation`` asks for it.
  """
  if augmentation.crop_scale:
    x_NHWC = random_resized_crop(jax.random.fold_in(rng, 1), images, size=size,
                                 scale_range=augmentation.crop_scale,
                                 ratio_range=augmentation.crop_ratio)
    x_NHWC = preprocess(x_NHWC, size=size, scale=scale)
  else:
    x_NHWC = evaluation_input(images, size=size, scale=scale, crop_fraction=crop_fraction)
  if augmentation.flip:
    x_NHWC = random_flip(jax.random.fold_in(rng, 2), x_NHWC)
  return augment(rng, x_NHWC, max_shift=augmentation.shift)


def augment(rng: jax.Array, images: jax.Array, *, max_shift: int) -> jax.Array:
  """Translates each image of [B,H,W,C] by its own random (dy, dx) in [-max_shift, max_shift],
  filling with zeros. ``max_shift=0`` returns ``images`` itself."""
  if max_shift < 0:
    raise ValueError(f"max_shift={max_shift} must be >= 0.")
  if max_shift == 0:
    return images
  b, h, w, c = images.shape
  m = max_shift
  padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
  corners = jax.random.randint(rng, (b, 2), 0, 2 * m + 1)

  def crop(image_HWC, corner):
    return jax.lax.dynamic_slice(image_HWC, (corner[0], corner[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, corners)
