"""What a dataset is once loaded: splits of uint8 images and int32 labels, and how a
validation split is cut from train.

Every source (``idx``, ``tfds``, ``folder``) returns a :class:`Dataset`; its splits hold
images in memory, or as a :class:`RowView` of a memory-mapped decoded cache to stream.
"""

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping

import numpy as np


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
  # A folder dataset's files of each split (relative to its root), and under "skipped" those
  # left out as unreadable, for <workdir>/splits.
  split_files: Mapping[str, tuple[str, ...]] | None = None

  def __post_init__(self):
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"{self.name}: {len(self.class_names)} class names for "
                       f"num_classes={self.num_classes}.")


def _slice(split: Split, start: int, stop: int) -> Split:
  return Split(split.images[start:stop], split.labels[start:stop])


def unreadable(path: str | os.PathLike, error: OSError) -> DataError:
  """A file or folder that is there but cannot be read (permissions, storage gone)."""
  return DataError(f"{path}: cannot be read ({error.strerror or error}); check its "
                   "permissions and that the storage holding it is reachable.")


def content_digest(*splits: Split) -> str:
  """The sha256 of the images and labels of ``splits``, with their shapes."""
  digest = hashlib.sha256()
  for split in splits:
    for array in (split.images, split.labels):
      digest.update(f"{array.dtype} {array.shape}\n".encode())
      digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


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


