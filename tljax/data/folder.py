"""Folder datasets: a user's photos in class folders, split, decoded once into a disk cache.

Two layouts, as users have them (class names are the sorted folder names, as in Keras's
``image_dataset_from_directory``; images in nested sub-folders belong to their top class
folder):

* ``root/<class>/...``: validation and test are cut from each class (stratified, seeded);
* ``root/train/<class>/...`` with optional ``validation/`` (or ``val/``, ``valid/``) and
  ``test/``; a missing split is cut from ``train/`` the same way.

The scan follows links to folders outside the root, each folder once, but not a link back into
the root or to a folder already walked (a loop), and leaves out tljax's own folders inside it
(the work directory and any other holding a run's outputs, the decoded cache); each is logged
with the other ignored files. File names must fit the split lists: no line breaks, UTF-8.

The file lists of the three splits (and of the files a run skipped as unreadable) are written to
``<workdir>/splits/<split>.txt`` and read back by a resumed run. Images are decoded in parallel
on every core to square uint8 pixels of a stored size and kept in a memory-mapped ``.npy`` cache
under ``data.cache_dir``, keyed by the files (paths, sizes, modification times) and the stored
size: a later run with the same files starts at once, and one changed file rebuilds it (and
removes the cache it supersedes). The cache's ``.json``, written last, holds a CRC-32 of the
``.npy``, checked whenever it is opened: a damaged cache is rebuilt, with a warning.
``python -m tljax.data.folder --clean-cache [--older-than DAYS]`` removes caches.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import pathlib
import re
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence

import ml_collections
import numpy as np
import tqdm

from tljax import download, files
from tljax.data import images
from tljax.data.dataset import Dataset, DataError, RowView, Split, unreadable

SPLITS = ("train", "validation", "test")
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val", "valid"),
                 "test": ("test",)}
STORED_MARGIN = 8 / 7       # The stored side over model.input_size: room for crops (0.875).
DECODE_VERSION = 1          # Part of the cache key: bump when decoding changes its pixels.
_LISTED = 10                # Offending paths named in one message.
_PARALLEL_FROM = 64         # Fewer files decode in this process: a pool costs more to start.
_SKIP_FIX = "or pass --config.data.skip_bad_images=true to train without them"
# Why the scan did not read something (Listing.ignored's keys).
_HIDDEN, _NOT_IMAGE, _NO_CLASS = "hidden", "not an image file", "not in a class folder"
_LINK_BACK = "link back into the data folder, not followed"
_LINK_AGAIN = "folder reached again through a link, not followed"
_TLJAX_OWN = "work directory or decoded cache, left out"
_ONLY_TLJAX = "folder holding only left-out folders, not a class"
_RUN_MARKS = ("metrics.jsonl", os.path.join("splits", "train.txt"))  # A work directory's files.


def _problem(what: str, paths: list[str], fix: str) -> DataError:
  """One message (one line) naming the first offending paths and their count, then the fix."""
  more = f"; ... and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
  return DataError(f"{len(paths)} {what}: {'; '.join(paths[:_LISTED])}{more}. {fix}")


def _entries(folder: str | os.PathLike) -> list[os.DirEntry]:
  """The entries of ``folder`` by name; an unreadable folder is a DataError."""
  try:
    with os.scandir(folder) as entries:
      return sorted(entries, key=lambda e: e.name)
  except OSError as e:
    raise unreadable(e.filename, e) from None


def _is_dir(path: pathlib.Path) -> bool:
  try:
    return path.is_dir()
  except OSError as e:  # Not "missing": e.g. a parent folder that cannot be entered.
    raise unreadable(e.filename, e) from None


def _entry_is_dir(entry: os.DirEntry) -> bool:
  try:
    return entry.is_dir()
  except OSError:  # A link to itself (ELOOP): a file that cannot be read, as os.walk has it.
    return False


def _inside(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder


# ---------------------------------------------------------------------------------------------
# Scanning.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Listing:
  """The image files under a root, by split folder, as paths relative to the root."""
  root: pathlib.Path
  layout: str                                 # "classes" or "splits".
  class_names: tuple[str, ...]
  files: dict[str, list[tuple[str, int]]]     # split -> sorted [(path, label)]; present
                                              # splits only ("train" = all in "classes").
  ignored: dict[str, list[str]]               # reason -> paths not read.

  def labels_by_path(self) -> dict[str, int]:
    return {path: label for files in self.files.values() for path, label in files}


class _Walker:
  """One scan's walk of the folders under ``root``; what it does not read goes to ``ignored``
  (reason -> paths relative to the root).

  A link to a folder outside the root is followed, but a link back into the root is not (its
  folders are listed where they are; a loop would list them again and again, under another
  class), nor is a folder already walked (a loop outside the root, or a second link to one
  folder, whose images would count twice, perhaps in two classes). The ``leave_out`` folders
  (the work directory, the decoded cache) and any folder holding a run's outputs
  (``metrics.jsonl`` or ``splits/train.txt``) are not entered.
  """

  def __init__(self, root: pathlib.Path, leave_out: Sequence[str | os.PathLike] = ()):
    self.root, self.real_root = root, os.path.realpath(root)
    self.leave_out = {os.path.realpath(path) for path in leave_out}
    self.visited: set[str] = set()
    self.ignored: dict[str, list[str]] = collections.defaultdict(list)

  def ignore(self, reason: str, path: str) -> None:
    self.ignored[reason].append(os.path.relpath(path, self.root))

  def enter(self, entry: os.DirEntry, parent_real: str) -> str | None:
    """The real path of the folder ``entry`` if the walk goes into it; else None, recorded."""
    link = entry.is_symlink()
    real = os.path.realpath(entry.path) if link else os.path.join(parent_real, entry.name)
    if real in self.leave_out or any(os.path.isfile(os.path.join(entry.path, mark))
                                     for mark in _RUN_MARKS):
      reason = _TLJAX_OWN
    elif link and _inside(real, self.real_root):
      reason = _LINK_BACK
    elif real in self.visited:
      reason = _LINK_AGAIN
    else:
      self.visited.add(real)
      return real
    self.ignore(reason, entry.path)
    return None

  def images(self, folder: str, real: str) -> Iterator[str]:
    """Yields the image files anywhere under ``folder`` (real path ``real``), relative to the
    root; records hidden and other files."""
    stack = [(folder, real)]
    while stack:
      directory, directory_real = stack.pop()
      for entry in _entries(directory):
        if entry.name.startswith("."):
          self.ignore(_HIDDEN, entry.path)
        elif _entry_is_dir(entry):
          if (entry_real := self.enter(entry, directory_real)) is not None:
            stack.append((entry.path, entry_real))
        elif images.is_image_name(entry.name):
          yield os.path.relpath(entry.path, self.root)
        else:
          self.ignore(_NOT_IMAGE, entry.path)

  def only_left_out(self, folder: str, real: str) -> bool:
    """Whether ``folder`` holds no images, only left-out folders (say ``runs/`` of work
    directories); if so, records it."""
    before = len(self.ignored[_TLJAX_OWN])
    if any(True for _ in self.images(folder, real)) or len(self.ignored[_TLJAX_OWN]) == before:
      return False
    self.ignore(_ONLY_TLJAX, folder)
    return True

  def classes(self, folder: str, real: str) -> dict[str, list[str]]:
    """Class folder name -> its image files, sorted, for the class folders in ``folder``."""
    classes = {}
    for entry in _entries(folder):
      if entry.name.startswith("."):
        self.ignore(_HIDDEN, entry.path)
      elif not _entry_is_dir(entry):
        self.ignore(_NO_CLASS, entry.path)
      elif (entry_real := self.enter(entry, real)) is not None:
        before = len(self.ignored[_TLJAX_OWN])
        found = sorted(self.images(entry.path, entry_real))
        if found or len(self.ignored[_TLJAX_OWN]) == before:
          classes[entry.name] = found
        else:
          self.ignore(_ONLY_TLJAX, entry.path)
    return classes


def _split_folders(root: pathlib.Path, top: dict[str, os.DirEntry],
                   walker: _Walker) -> dict[str, str]:
  """split -> its folder name in a ``root/train/`` layout; checks nothing else is there (but
  tljax's own folders)."""
  found = {split: [n for n in names if n in top] for split, names in SPLIT_FOLDERS.items()}
  for split, names in found.items():
    if len(names) > 1:
      raise DataError(f"{root} has {len(names)} {split} folders ({', '.join(names)}); "
                           "keep one of them.")
  others = sorted(set(top) - {n for names in found.values() for n in names})
  others = [name for name in others
            if (real := walker.enter(top[name], walker.real_root)) is not None
            and not walker.only_left_out(top[name].path, real)]
  if others:
    raise _problem(f"folders in {root} beside train/ that are no split", others,
                   "With a train/ folder the root holds only train/, validation/ (or val/, "
                   "valid/) and test/, each with one folder per class; move these into them.")
  return {split: names[0] for split, names in found.items() if names}


def _listable(name: str) -> bool:
  """Whether a split list (one path a line, UTF-8) can hold ``name``."""
  try:
    name.encode("utf-8")
  except UnicodeEncodeError:  # Bytes that are not UTF-8, as Python's file names keep them.
    return False
  return "\n" not in name and "\r" not in name


def _check_names(by_split: dict[str, dict[str, list[str]]]) -> None:
  """Refuses class folders and files whose names a split list cannot hold."""
  bad = sorted({repr(path) for classes in by_split.values()
                for name, paths in classes.items()
                for path in ([name] if not _listable(name) else paths) if not _listable(path)})
  if bad:
    raise _problem("file or folder names with a line break or bytes that are not UTF-8", bad,
                   "Rename them: a run lists its files in <workdir>/splits/*.txt, one UTF-8 "
                   "path a line, to resume on the same splits.")


def _scan_splits(root: pathlib.Path, walker: _Walker) -> tuple[str, dict]:
  """The layout and split -> class -> image files, as found under ``root``."""
  top = {e.name: e for e in _entries(root) if _entry_is_dir(e) and not e.name.startswith(".")}
  if "train" not in top:
    return "classes", {"train": walker.classes(str(root), walker.real_root)}
  by_split = {}
  for split, name in _split_folders(root, top, walker).items():
    if (real := walker.enter(top[name], walker.real_root)) is not None:
      by_split[split] = walker.classes(top[name].path, real)
  return "splits", by_split


def scan(root: str | os.PathLike, leave_out: Sequence[str | os.PathLike] = ()) -> Listing:
  """The image files under ``root`` in either layout, not looking into the ``leave_out``
  folders (the work directory, the decoded cache); raises DataError for a root with no
  images, a single class, an empty class folder, classes missing from train or names the split
  lists cannot hold."""
  root = pathlib.Path(root)
  if not _is_dir(root):
    raise DataError(f"data.dir {str(root)!r} is not a folder. Give a folder with one "
                         "sub-folder of images per class (or train/ holding those).")
  walker = _Walker(root, leave_out)
  layout, by_split = _scan_splits(root, walker)
  by_split.setdefault("train", {})
  _check_names(by_split)
  if not any(paths for classes in by_split.values() for paths in classes.values()):
    example = "train/<class>/" if layout == "splits" else "<class>/"
    raise DataError(f"{root} holds no images ({', '.join(images.IMAGE_EXTENSIONS)}). "
                         f"Put each class's images in {root}/{example}.")
  empty = [str(pathlib.Path(root.name) / ("" if layout == "classes" else SPLIT_FOLDERS[s][0])
               / name) for s, classes in by_split.items()
           for name, paths in classes.items() if not paths]
  if empty:
    raise _problem("class folders without images", empty,
                   "Put images in them or remove them.")
  class_names = tuple(sorted(by_split["train"]))
  if len(class_names) < 2:
    raise DataError(f"{root}: found {len(class_names)} class folder "
                         f"({', '.join(class_names)}); a classifier needs at least two. Put "
                         "each class's images in its own folder.")
  unknown = [f"{split}/{name}" for split, classes in by_split.items()
             for name in classes if name not in class_names]
  if unknown:
    raise _problem("class folders with no counterpart in train/", unknown,
                   f"The classes are train/'s folders ({', '.join(class_names)}); add the "
                   "class to train/ or remove these folders.")
  files = {split: sorted((path, class_names.index(name))
                         for name, paths in classes.items() for path in paths)
           for split, classes in by_split.items()}
  return Listing(root, layout, class_names, files,
                 {k: sorted(v) for k, v in walker.ignored.items() if v})


def is_image_folder(path: str | os.PathLike) -> bool:
  """Whether ``path`` looks like a folder dataset: a sub-folder (of ``train/`` if there is
  one) holds an image file somewhere below it. (What ``data.source=auto`` detects.)"""
  root = pathlib.Path(path)
  if not _is_dir(root):
    return False
  base = root / "train" if _is_dir(root / "train") else root
  walker = _Walker(root)
  base_real = os.path.realpath(base)
  for entry in _entries(base):
    if _entry_is_dir(entry) and not entry.name.startswith("."):
      real = walker.enter(entry, base_real)
      if real is not None and any(True for _ in walker.images(entry.path, real)):
        return True
  return False


# ---------------------------------------------------------------------------------------------
# Splitting.
# ---------------------------------------------------------------------------------------------


def _cut_fractions(listing: Listing, *, validation_split: float,
                   test_split: float) -> dict[str, float]:
  """The fraction of each class that each split without its own folder takes from train."""
  return {split: fraction for split, fraction in
          (("validation", validation_split), ("test", test_split)) if split not in listing.files}


def _cut_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
  """How many of a class's ``n`` images each cut split takes: ``n * fraction`` rounded half up,
  with at least one image left in train."""
  counts, start = {}, 0
  for split, fraction in fractions.items():
    counts[split] = min(int(n * fraction + 0.5), n - 1 - start)
    start += counts[split]
  return counts


def split_listing(listing: Listing, *, validation_split: float, test_split: float,
                  seed: int) -> dict[str, list[tuple[str, int]]]:
  """Each split's sorted ``(path, label)``; splits without a folder are cut from train.

  The cut is per class (stratified): a class of n images gives ``n * fraction`` images,
  rounded half up, to each cut split (at least one image stays in train), chosen by a
  permutation seeded by ``seed`` and the class.
  """
  fractions = _cut_fractions(listing, validation_split=validation_split, test_split=test_split)
  splits = {split: list(listing.files.get(split, [])) for split in SPLITS}
  if not fractions:
    return splits
  splits["train"] = []
  for label in range(len(listing.class_names)):
    paths = [p for p, l in listing.files["train"] if l == label]
    order = np.random.default_rng([seed, label]).permutation(len(paths))
    start = 0
    for split, count in _cut_counts(len(paths), fractions).items():
      splits[split] += [(paths[i], label) for i in order[start:start + count]]
      start += count
    splits["train"] += [(paths[i], label) for i in order[start:]]
  return {split: sorted(files) for split, files in splits.items()}


def _class_counts(listing: Listing, splits: Mapping[str, list[tuple[str, int]]]
                  ) -> list[tuple[str, dict[str, int]]]:
  """``(class name, split -> its images of the class)`` for each class."""
  counts = {split: np.bincount([label for _, label in files],
                               minlength=len(listing.class_names))
            for split, files in splits.items()}
  return [(name, {split: int(counts[split][label]) for split in SPLITS})
          for label, name in enumerate(listing.class_names)]


def _check_classes(listing: Listing, splits: Mapping[str, list[tuple[str, int]]],
                   fractions: Mapping[str, float]) -> None:
  """Refuses a class without an image in train or in test: it could not be learnt, or its test
  accuracy would be missing and the macro average wrong. Warns of a class without a validation
  image (only the validation metrics are off)."""
  def described(name, counts):
    return (f"{name} ({sum(counts.values())} images: "
            + ", ".join(f"{split} {counts[split]}" for split in SPLITS) + ")")
  classes = _class_counts(listing, splits)
  bad = [described(name, c) for name, c in classes if not (c["train"] and c["test"])]
  if bad:
    at_least = "test" in fractions and next(
        (n for n in range(1, 10**6) if _cut_counts(n, fractions)["test"]), 0)
    need = (f" (with data.validation_split={fractions.get('validation', 0.0)} and "
            f"data.test_split={fractions['test']}, a class needs at least {at_least})"
            if at_least else "")
    raise _problem("classes without an image in train or in test", bad,
                   f"Each class needs images to train on and to test on: add images to these "
                   f"classes{need}, or remove their folders.")
  no_validation = [described(name, c) for name, c in classes
                   if splits["validation"] and not c["validation"]]
  if no_validation:
    logging.warning("%s: %d classes have no validation image, so their validation accuracy is "
                    "not measured: %s", listing.root, len(no_validation),
                    "; ".join(no_validation[:_LISTED]))


def write_split_lists(directory: pathlib.Path, split_files: Mapping[str, Sequence[str]]):
  """``<directory>/<split>.txt``: the split's paths relative to the root, one a line (and
  ``skipped.txt``: the unreadable files a run left out, where ``split_files`` has them).

  ``train.txt`` comes last: :func:`read_split_lists` takes the lists once it exists, so
  another process loading the folder meanwhile reads all of them or none.
  """
  files.make_workdir(directory)
  for split in sorted(split_files, key=lambda split: split == "train"):
    with files.atomic_open(directory / f"{split}.txt") as f:
      f.writelines(f"{path}\n" for path in split_files[split])


def read_split_lists(directory: pathlib.Path, listing: Listing
                     ) -> tuple[dict[str, list[tuple[str, int]]], list[str]] | None:
  """The splits written by an earlier run in this workdir and the files it skipped as
  unreadable, None if there are none; raises DataError if the splits name files the root no
  longer has."""
  if not (directory / "train.txt").is_file():
    return None
  labels = listing.labels_by_path()
  lists = {}
  for name in (*SPLITS, "skipped"):
    path = directory / f"{name}.txt"
    if name != "skipped" or path.is_file():  # No skipped.txt: none skipped, or an older run.
      lists[name] = [line for line in path.read_text(encoding="utf-8").split("\n") if line]
  skipped = lists.pop("skipped", [])
  missing = [p for paths in lists.values() for p in paths if p not in labels]
  if missing:
    raise _problem(f"files listed in {directory} (this run's splits) missing from "
                   f"{listing.root}", missing,
                   "Restore them, or start a new run in another --workdir.")
  added = len(set(labels) - set(skipped)) - sum(len(paths) for paths in lists.values())
  if added:
    logging.warning("%s: %d image files are not in this run's split lists in %s (added since "
                    "it began); they are not used. Start a new run in another --workdir to "
                    "use them.", listing.root, added, directory)
  return {split: [(p, labels[p]) for p in paths] for split, paths in lists.items()}, skipped


# ---------------------------------------------------------------------------------------------
# Decoding, cached.
# ---------------------------------------------------------------------------------------------


def stored_size(image_size: int, input_size: int) -> int:
  """The side of the square images in the cache: ``image_size`` (``data.image_size``), or
  (0) the model's ``input_size`` times 8/7 rounded up to a multiple of 8 (160 -> 184)."""
  if image_size:
    return image_size
  return 8 * math.ceil(input_size * STORED_MARGIN / 8)


def default_cache_dir() -> pathlib.Path:
  """``$TLJAX_CACHE/decoded``, else ``~/.cache/tljax/decoded``."""
  return download.default_cache_dir() / "decoded"


def cache_key(root: pathlib.Path, paths: list[str], size: int) -> str:
  """Names the decoded cache of ``paths`` (relative to ``root``) at ``size``: changes with
  any file's path, size or modification time."""
  stats = []
  for path in paths:
    try:
      st = (root / path).stat()
      stats.append((path, st.st_size, st.st_mtime_ns))
    except OSError:
      stats.append((path, -1, -1))  # Reported by the decoder.
  text = json.dumps([DECODE_VERSION, str(root.resolve()), size, stats])
  return hashlib.sha256(text.encode()).hexdigest()[:32]


class CacheWriteError(files.OutputWriteError):
  """The decoded cache cannot be written (a full disk, storage gone): a run failure, exit 1."""


class _Unusable(Exception):
  """A decoded cache that cannot be used; the message says why."""


class _Terminated(BaseException):
  """SIGTERM during a decode, raised in the main thread so that the decode cleans up."""


_CACHE_FILE = re.compile(r"^[0-9a-f]{32}\.(npy|json)$")
_TEMP_FILE = re.compile(r"^\.([0-9a-f]{32})\.(\d+)(?:@(.*))?\.npy\.tmp$")  # key, pid, host.


def _amount(nbytes: int) -> str:
  """``nbytes`` in GB, MB or KB, whichever shows it best with one decimal."""
  unit = next((u for u in (3, 2, 1) if nbytes >= 2**(10 * u) // 10), 0)
  return f"{nbytes / 2**(10 * unit):.1f} {('KB', 'MB', 'GB')[unit - 1]}" if unit else (
      f"{nbytes} bytes")


def _digest(path: pathlib.Path) -> str:
  """``crc32:<hex>`` of the file: catches a damaged cache (zeroed, truncated, flipped bits),
  faster than a cryptographic hash; not meant to resist someone who edits it on purpose."""
  crc, buffer = 0, bytearray(8 << 20)
  view = memoryview(buffer)
  with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buffer):
      crc = zlib.crc32(view[:n], crc)
  return f"crc32:{crc:08x}"


@contextlib.contextmanager
def _write_errors(path: pathlib.Path, nbytes: int) -> Iterator[None]:
  """An OSError inside the block becomes a CacheWriteError naming ``path`` and the fix."""
  try:
    yield
  except OSError as e:
    full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    fix = ("Free space there, or set --config.data.cache_dir to a folder with room" if full
           else "Check that it can be written, or set --config.data.cache_dir to another folder")
    raise CacheWriteError(f"writing the decoded cache {path} ({_amount(nbytes)}) failed: "
                          f"{e.strerror or e}. {fix}.") from e


def _allocate(f, size: int) -> None:
  """Allocates the first ``size`` bytes of the open file ``f`` on disk: a full disk is an
  OSError now, not a SIGBUS when a page of its memory map is first written."""
  if hasattr(os, "posix_fallocate"):
    try:
      os.posix_fallocate(f.fileno(), 0, size)
      return
    except OSError as e:
      if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
  f.seek(0, os.SEEK_END)  # No fallocate here (macOS, some file systems): write zeros.
  zeros = bytes(1 << 20)
  for _ in range(f.tell(), size, len(zeros)):
    f.write(zeros[:size - f.tell()])
  f.flush()
  os.fsync(f.fileno())


def _new_npy(path: pathlib.Path, shape: tuple[int, ...]) -> np.memmap:
  """A new uint8 ``.npy`` of ``shape``, its space allocated, memory-mapped for writing."""
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False, "shape": shape}
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, header)
    _allocate(f, f.tell() + math.prod(shape))
  return np.lib.format.open_memmap(path, "r+")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's.
    return True
  return True


def _remove_dead_temps(cache_dir: pathlib.Path) -> None:
  """Removes the temporary files of decodes on this host whose process is gone (killed)."""
  host, removed = socket.gethostname(), 0
  for path in cache_dir.glob(".*.npy.tmp"):
    match = _TEMP_FILE.match(path.name)
    if match and match[3] in (None, host) and not _alive(int(match[2])):
      with contextlib.suppress(OSError):
        removed += path.stat().st_size
        path.unlink()
  if removed:
    logging.info("%s: removed %s of unfinished caches of decodes that were killed", cache_dir,
                 _amount(removed))


def _remove_cache(meta_path: pathlib.Path) -> int:
  """Removes a cache, its meta first (so that it is never taken as finished); returns the
  bytes freed."""
  freed = 0
  for path in (meta_path, meta_path.with_suffix(".npy")):
    with contextlib.suppress(OSError):
      freed += path.stat().st_size
      path.unlink()
  return freed


def _open_cache(array_path: pathlib.Path, meta_path: pathlib.Path,
                shape: tuple[int, ...]) -> tuple[np.ndarray, dict[str, str]]:
  """A finished cache's images (memory-mapped) and failed files; raises _Unusable saying why
  it cannot be used: its files cannot be read, it has another shape, or not its digest."""
  try:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    digest, failed = meta.get("digest"), dict(meta["failed"])
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    raise _Unusable(f"cannot be used: its {meta_path.name} cannot be read ({e})") from None
  if digest is None:
    raise _Unusable("has no checksum (written by an older tljax)")
  try:
    pixels = np.load(array_path, mmap_mode="r")
  except (OSError, ValueError, EOFError) as e:
    raise _Unusable(f"cannot be opened ({e})") from None
  if pixels.dtype != np.uint8 or pixels.shape != shape:
    raise _Unusable(f"holds {pixels.dtype} {pixels.shape}, not uint8 {shape}")
  if _digest(array_path) != digest:
    raise _Unusable(f"is damaged: it does not match its checksum ({digest})")
  with contextlib.suppress(OSError):
    os.utime(meta_path)  # Marks it used, for clean_cache(older_than_days=...).
  return pixels, failed


@contextlib.contextmanager
def _decode_pool() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
  """One decode process per core, spawned (the caller runs threads), each exiting if this
  process dies; on any exception (KeyboardInterrupt, SIGTERM) they are terminated at once."""
  pool = concurrent.futures.ProcessPoolExecutor(
      os.cpu_count(), mp_context=multiprocessing.get_context("spawn"),
      initializer=images.exit_with_parent, initargs=(os.getpid(),))
  try:
    yield pool
  except BaseException:
    workers = list((pool._processes or {}).values())  # noqa: SLF001 - no public way before 3.14.
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:  # A worker blocked writing to the pool's pipe would never exit.
      worker.terminate()
    for worker in workers:
      worker.join(timeout=5)
    raise
  pool.shutdown()


def _decode_into(out: np.ndarray, root: pathlib.Path, paths: list[str], size: int,
                 progress: bool) -> dict[str, str]:
  """Decodes ``paths`` into the rows of ``out``, in a pool for many files; returns path -> why,
  for those that failed."""
  jobs, failed = [str(root / path) for path in paths], {}
  with contextlib.ExitStack() as stack:
    if len(jobs) < _PARALLEL_FROM:
      results = map(images.try_load_stored, jobs, itertools.repeat(size))
    else:
      pool = stack.enter_context(_decode_pool())
      results = pool.map(images.try_load_stored, jobs, itertools.repeat(size), chunksize=16)
    for i, (pixels, error) in enumerate(tqdm.tqdm(
        results, total=len(paths), unit="image", desc=f"decoding {root.name}",
        disable=not (progress and sys.stderr.isatty()))):
      if error is None:
        out[i] = pixels
      else:
        failed[paths[i]] = error
  return failed


@contextlib.contextmanager
def _sigterm_stops_decode() -> Iterator[None]:
  """Where SIGTERM would end the process at once (its default action), makes it raise in the
  main thread inside the block, so that the decode stops its workers and removes its temporary
  file; then raises the signal again, to end the process as it would have (143)."""
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
    yield
    return

  def stop(signum, frame):
    raise _Terminated

  signal.signal(signal.SIGTERM, stop)
  try:
    yield
  except _Terminated:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.warning("SIGTERM while decoding images: stopped the decode workers and removed the "
                    "unfinished cache; rerun the same command to start again.")
    signal.raise_signal(signal.SIGTERM)
    raise SystemExit(128 + signal.SIGTERM) from None  # Only if the signal is blocked.
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_cache(array_path: pathlib.Path, root: pathlib.Path, paths: list[str],
                 size: int, progress: bool) -> dict[str, str]:
  """Decodes ``paths`` into the cache ``array_path`` through a temporary file (removed
  whatever happens), then writes its meta with the digest, last; returns the failed files."""
  shape = (len(paths), size, size, 3)
  nbytes = math.prod(shape)
  tmp_path = array_path.with_name(
      f".{array_path.stem}.{os.getpid()}@{socket.gethostname()}.npy.tmp")
  try:
    with _write_errors(array_path, nbytes):
      out = _new_npy(tmp_path, shape)
    failed = _decode_into(out, root, paths, size, progress)
    with _write_errors(array_path, nbytes):
      out.flush()
      del out
      digest = _digest(tmp_path)
      os.replace(tmp_path, array_path)
      files.write_json(array_path.with_suffix(".json"), {
          "root": str(root.resolve()), "size": size, "files": len(paths), "failed": failed,
          "digest": digest})  # Written last: marks the cache done.
  finally:
    tmp_path.unlink(missing_ok=True)
  return failed


def _remove_superseded(cache_dir: pathlib.Path, root: pathlib.Path, size: int, key: str):
  """Removes the caches of ``root`` at ``size`` but ``key`` (their files have changed since),
  then logs what the cache folder holds."""
  real_root, removed, freed = os.path.realpath(root), 0, 0
  for meta_path in cache_dir.glob("*.json"):
    if meta_path.stem == key or not _CACHE_FILE.match(meta_path.name):
      continue
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
      meta = json.loads(meta_path.read_text(encoding="utf-8"))
      if meta["size"] == size and os.path.realpath(meta["root"]) == real_root:
        freed += _remove_cache(meta_path)
        removed += 1
  caches = [p for p in cache_dir.iterdir() if _CACHE_FILE.match(p.name)]
  logging.info("%s: %d decoded caches, %s%s; `python -m tljax.data.folder --clean-cache "
               "--older-than DAYS` removes those unused for DAYS days", cache_dir,
               sum(p.suffix == ".json" for p in caches),
               _amount(sum(p.stat().st_size for p in caches)),
               f" (removed {removed} older caches of {root}, {_amount(freed)})" if removed else "")


def decoded_images(root: pathlib.Path, paths: list[str], size: int,
                   cache_dir: pathlib.Path, progress: bool = True
                   ) -> tuple[np.ndarray, dict[str, str]]:
  """uint8 [len(paths), size, size, 3] (memory-mapped, read-only) and the files that could
  not be decoded (path -> why; their rows are zeros), from the cache or decoded into it.

  A cache that cannot be opened or does not match its digest is decoded again, with a warning.
  """
  key = cache_key(root, paths, size)
  array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
  shape = (len(paths), size, size, 3)
  if meta_path.is_file():  # Written last: the cache is finished.
    try:
      pixels, failed = _open_cache(array_path, meta_path, shape)
    except _Unusable as e:
      logging.warning("the decoded cache %s %s: decoding the images again", array_path, e)
      _remove_cache(meta_path)
    else:
      logging.info("%s: %d decoded images from the cache %s", root, len(paths), array_path)
      return pixels, failed
  with _write_errors(cache_dir, math.prod(shape)):
    cache_dir.mkdir(parents=True, exist_ok=True)
  _remove_dead_temps(cache_dir)
  started = time.perf_counter()
  with _sigterm_stops_decode():
    failed = _write_cache(array_path, root, paths, size, progress)
  seconds = time.perf_counter() - started
  logging.info("%s: decoded %d images in %.1f s (%.0f images/s) to %s", root, len(paths),
               seconds, len(paths) / seconds, array_path)
  _remove_superseded(cache_dir, root, size, key)
  return np.load(array_path, mmap_mode="r"), failed


def clean_cache(cache_dir: str | os.PathLike | None = None,
                older_than_days: float = 0.0) -> tuple[int, int]:
  """Removes the decoded caches in ``cache_dir`` (default :func:`default_cache_dir`) that no
  run opened for ``older_than_days`` days (0: all), and the temporary files of killed decodes;
  returns the caches removed and the bytes freed."""
  cache_dir = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  if not cache_dir.is_dir():
    return 0, 0
  _remove_dead_temps(cache_dir)
  cutoff, removed, freed = time.time() - older_than_days * 86400, 0, 0
  for path in sorted(cache_dir.iterdir()):
    meta_path = path.with_suffix(".json")
    if not _CACHE_FILE.match(path.name) or (path.suffix == ".npy" and meta_path.exists()):
      continue  # Not a cache; an array goes with its meta (alone, it is unfinished).
    with contextlib.suppress(OSError):
      if path.stat().st_mtime <= cutoff:
        freed += _remove_cache(meta_path)
        removed += path.suffix == ".json"
  return removed, freed


# ---------------------------------------------------------------------------------------------
# The dataset.
# ---------------------------------------------------------------------------------------------


def _log_listing(listing: Listing, splits: dict[str, list[tuple[str, int]]]) -> None:
  counts = ", ".join(f"{split} {len(files)}" for split, files in splits.items())
  logging.info("%s (%s layout): %d classes (%s); %s images", listing.root, listing.layout,
               len(listing.class_names), ", ".join(listing.class_names), counts)
  for reason, paths in listing.ignored.items():
    logging.info("%s: ignored %d files (%s), e.g. %s", listing.root, len(paths), reason,
                 ", ".join(paths[:3]))


def _streams(n: int, size: int, data_config) -> bool:
  """Whether the decoded images stream from the cache rather than sit in memory: always with
  ``data.stream=on``; with ``auto`` where they exceed ``data.max_memory_gb``; never with
  ``off``, which refuses such a dataset before decoding."""
  needed = n * size * size * 3
  too_big = needed > data_config.max_memory_gb * 2**30
  if too_big and data_config.stream == "off":
    raise DataError(
        f"the {n} decoded images at {size}x{size} need {needed / 2**30:.1f} GB, more than "
        f"data.max_memory_gb={data_config.max_memory_gb}, and data.stream=off. Set "
        "data.stream=auto to stream them from the disk cache, lower model.input_size (or "
        "data.image_size), use fewer images (data.train_examples), or raise "
        "data.max_memory_gb if the memory is there.")
  if too_big and data_config.stream == "auto":
    logging.info("the %d decoded images at %dx%d need %.1f GB > data.max_memory_gb=%s: "
                 "streaming them from the disk cache", n, size, size, needed / 2**30,
                 data_config.max_memory_gb)
  return data_config.stream == "on" or too_big


def _without_failed(root: pathlib.Path, splits: dict[str, list[tuple[str, int]]],
                    failed: Mapping[str, str], skip: bool) -> dict[str, list[tuple[str, int]]]:
  """``splits`` without the files that failed to decode: one DataError naming them, unless
  ``skip`` (``data.skip_bad_images``): then a warning."""
  if failed and not skip:
    raise _problem("image files that cannot be read",
                   [f"{p} ({why})" for p, why in failed.items()],
                   f"Replace or remove them, {_SKIP_FIX}.")
  if failed:
    logging.warning("%s: skipping %d image files that cannot be read: %s", root, len(failed),
                    ", ".join(list(failed)[:_LISTED]))
  return {split: [(path, label) for path, label in files if path not in failed]
          for split, files in splits.items()}


def train_order(n: int, seed: int) -> np.ndarray:
  """Row i of a folder dataset's train split is ``split_files["train"][train_order(n, seed)[i]]``:
  training examples come in a seeded random order, not by class, so that
  data.train_examples's first N are a sample of every class."""
  return np.random.default_rng(seed).permutation(n)


def load_folder(data_config: ml_collections.ConfigDict, *, stored_size: int, seed: int,
                splits_dir: pathlib.Path | None, progress: bool = True,
                workdir: pathlib.Path | None = None) -> Dataset:
  """The folder ``data_config.dir`` (a config's ``data`` section) as a Dataset with its own
  validation split, its images decoded at ``stored_size`` (:func:`stored_size`).

  Split lists are read from ``splits_dir`` if an earlier run wrote them there
  (:func:`write_split_lists` of ``Dataset.split_files``), else cut (seeded by ``seed``). Bad
  image files raise one DataError listing them, unless ``data.skip_bad_images``: then they are
  left out with a warning, named in ``Dataset.skipped`` and kept out of the split lists (in
  ``split_files["skipped"]``). ``workdir`` and the decoded cache are left out of the scan.
  """
  config = data_config
  cache_dir = (pathlib.Path(config.cache_dir).expanduser() if config.cache_dir
               else default_cache_dir())
  listing = scan(config.dir, [path for path in (workdir, cache_dir) if path])
  labels = listing.labels_by_path()
  recorded = read_split_lists(splits_dir, listing) if splits_dir else None
  splits, skipped = recorded or (split_listing(
      listing, validation_split=config.validation_split, test_split=config.test_split,
      seed=seed), [])
  _log_listing(listing, splits)
  if not splits["test"]:
    raise DataError(f"{listing.root} has no test images: add a test/ folder beside "
                         "train/, or set data.test_split > 0 to hold some out.")
  size = stored_size
  # A resumed run decodes the files its first run skipped too: the same files, the same cache.
  paths = sorted([path for files in splits.values() for path, _ in files]
                 + [path for path in skipped if path in labels])
  stream = _streams(len(paths), size, config)
  pixels, failed = decoded_images(listing.root, paths, size, cache_dir, progress)
  splits = _without_failed(listing.root, splits, failed, config.skip_bad_images)
  skipped = sorted(set(skipped) | set(failed))
  _check_classes(listing, splits, _cut_fractions(
      listing, validation_split=config.validation_split, test_split=config.test_split))
  row = {path: i for i, path in enumerate(paths)}

  def to_split(files):
    rows = np.array([row[path] for path, _ in files], np.int64)
    labels = np.array([label for _, label in files], np.int32)
    if stream:
      return Split(RowView(pixels, rows), labels)
    return Split(np.asarray(pixels[rows]) if files else np.zeros((0, size, size, 3),
                                                                      np.uint8), labels)

  shuffled = train_order(len(splits["train"]), seed)
  train = to_split([splits["train"][i] for i in shuffled])
  validation, test = to_split(splits["validation"]), to_split(splits["test"])
  names = listing.class_names
  # The files used (each path's size and modification time), which split each is in, and
  # those skipped: the same for a resumed run.
  used = sorted(path for files in splits.values() for path, _ in files)
  identity = hashlib.sha256(json.dumps([cache_key(listing.root, used, size), splits,
                                        skipped]).encode()).hexdigest()
  split_files = {split: tuple(path for path, _ in files) for split, files in splits.items()}
  if skipped:
    split_files["skipped"] = tuple(skipped)
  return Dataset(train, test, len(names), names, listing.root.name,
                      identity=f"folder sha256:{identity}", validation=validation,
                      skipped=tuple(skipped), split_files=split_files)


# ---------------------------------------------------------------------------------------------
# Cleaning the cache: python -m tljax.data.folder --clean-cache [--older-than DAYS]
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  """Removes decoded caches; returns the exit code."""
  parser = argparse.ArgumentParser(
      prog="python -m tljax.data.folder",
      description="Removes the decoded caches of folder datasets (a run decodes again what "
                  "it needs).")
  parser.add_argument("--clean-cache", action="store_true", required=True,
                      help="remove the caches (and the unfinished ones of killed decodes)")
  parser.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                      help="only those no run opened for DAYS days (default 0: all)")
  parser.add_argument("--cache-dir", default="", metavar="DIR",
                      help="the folder (data.cache_dir; default $TLJAX_CACHE/decoded or "
                           "~/.cache/tljax/decoded)")
  args = parser.parse_args(argv)
  cache_dir = args.cache_dir or default_cache_dir()
  removed, freed = clean_cache(cache_dir, args.older_than)
  print(f"{cache_dir}: removed {removed} decoded caches, {_amount(freed)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
