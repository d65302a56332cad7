"""Folder datasets: a user's photos in class folders, split, decoded once into a disk cache.

Two layouts, as users have them (class names are the sorted folder names, as in Keras's
``image_dataset_from_directory``; images in nested sub-folders belong to their top class
folder):

* ``root/<class>/...``: validation and test are cut from each class (stratified, seeded);
* ``root/train/<class>/...`` with optional ``validation/`` (or ``val/``, ``valid/``) and
  ``test/``; a missing split is cut from ``train/`` the same way.

The file lists of the three splits are written to ``<workdir>/splits/<split>.txt`` and read
back by a resumed run. Images are decoded in parallel on every core to square uint8 pixels
of a stored size and kept in a memory-mapped ``.npy`` cache under ``data.cache_dir``, keyed
by the files (paths, sizes, modification times) and the stored size: a later run with the
same files starts at once, and one changed file rebuilds it.
"""

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence

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


def _walk(folder: str | os.PathLike):
  """``os.walk(folder)``, following links, where an unreadable folder is a DataError (not
  skipped)."""
  def refuse(error: OSError):
    raise unreadable(error.filename, error) from None
  return os.walk(folder, onerror=refuse, followlinks=True)


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


def _walk_class(folder: pathlib.Path, root: pathlib.Path,
                ignored: dict[str, list[str]]) -> list[str]:
  """Image files anywhere under one class folder; hidden and other files go to ``ignored``."""
  found = []
  for directory, subdirs, names in _walk(folder):
    rel = pathlib.Path(directory).relative_to(root)
    for name in sorted(d for d in subdirs if d.startswith(".")):
      ignored["hidden"].append(str(rel / name))
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    for name in sorted(names):
      reason = ("hidden" if name.startswith(".") else
                None if images.is_image_name(name) else "not an image file")
      (ignored[reason] if reason else found).append(str(rel / name))
  return sorted(found)


def _scan_classes(folder: pathlib.Path, root: pathlib.Path,
                  ignored: dict[str, list[str]]) -> dict[str, list[str]]:
  """Class folder name -> its image files, for the class folders directly in ``folder``."""
  classes = {}
  for entry in _entries(folder):
    rel = str(pathlib.Path(entry.path).relative_to(root))
    if entry.name.startswith("."):
      ignored["hidden"].append(rel)
    elif entry.is_dir():
      classes[entry.name] = _walk_class(pathlib.Path(entry.path), root, ignored)
    else:
      ignored["not in a class folder"].append(rel)
  return classes


def _split_folders(root: pathlib.Path, top: list[str]) -> dict[str, str]:
  """split -> its folder name in a ``root/train/`` layout; checks nothing else is there."""
  found = {split: [n for n in names if n in top] for split, names in SPLIT_FOLDERS.items()}
  for split, names in found.items():
    if len(names) > 1:
      raise DataError(f"{root} has {len(names)} {split} folders ({', '.join(names)}); "
                           "keep one of them.")
  others = sorted(set(top) - {n for names in found.values() for n in names})
  if others:
    raise _problem(f"folders in {root} beside train/ that are no split", others,
                   "With a train/ folder the root holds only train/, validation/ (or val/, "
                   "valid/) and test/, each with one folder per class; move these into them.")
  return {split: names[0] for split, names in found.items() if names}


def scan(root: str | os.PathLike) -> Listing:
  """The image files under ``root`` in either layout; raises DataError for a root with no
  images, a single class, an empty class folder or classes missing from train."""
  root = pathlib.Path(root)
  if not _is_dir(root):
    raise DataError(f"data.dir {str(root)!r} is not a folder. Give a folder with one "
                         "sub-folder of images per class (or train/ holding those).")
  ignored = {"hidden": [], "not an image file": [], "not in a class folder": []}
  top = [e.name for e in _entries(root) if e.is_dir() and not e.name.startswith(".")]
  if "train" in top:
    layout = "splits"
    by_split = {split: _scan_classes(root / name, root, ignored)
                for split, name in _split_folders(root, top).items()}
  else:
    layout, by_split = "classes", {"train": _scan_classes(root, root, ignored)}
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
  return Listing(root, layout, class_names, files, {k: v for k, v in ignored.items() if v})


def is_image_folder(path: str | os.PathLike) -> bool:
  """Whether ``path`` looks like a folder dataset: a sub-folder (of ``train/`` if there is
  one) holds an image file somewhere below it. (What ``data.source=auto`` detects.)"""
  root = pathlib.Path(path)
  if not _is_dir(root):
    return False
  base = root / "train" if _is_dir(root / "train") else root
  for entry in _entries(base):
    if entry.is_dir() and not entry.name.startswith("."):
      for _, _, names in _walk(entry.path):
        if any(images.is_image_name(n) for n in names):
          return True
  return False


# ---------------------------------------------------------------------------------------------
# Splitting.
# ---------------------------------------------------------------------------------------------


def split_listing(listing: Listing, *, validation_split: float, test_split: float,
                  seed: int) -> dict[str, list[tuple[str, int]]]:
  """Each split's sorted ``(path, label)``; splits without a folder are cut from train.

  The cut is per class (stratified): a class of n images gives ``n * fraction`` images,
  rounded half up, to each cut split (at least one image stays in train), chosen by a
  permutation seeded by ``seed`` and the class.
  """
  fractions = {split: fraction for split, fraction in
               (("validation", validation_split), ("test", test_split))
               if split not in listing.files}
  splits = {split: list(listing.files.get(split, [])) for split in SPLITS}
  if not fractions:
    return splits
  splits["train"] = []
  for label in range(len(listing.class_names)):
    paths = [p for p, l in listing.files["train"] if l == label]
    order = np.random.default_rng([seed, label]).permutation(len(paths))
    start = 0
    for split, fraction in fractions.items():
      count = min(int(len(paths) * fraction + 0.5), len(paths) - 1 - start)
      splits[split] += [(paths[i], label) for i in order[start:start + count]]
      start += count
    splits["train"] += [(paths[i], label) for i in order[start:]]
  return {split: sorted(files) for split, files in splits.items()}


def write_split_lists(directory: pathlib.Path, split_files: Mapping[str, Sequence[str]]):
  """``<directory>/<split>.txt``: the split's paths relative to the root, one a line.

  ``train.txt`` comes last: :func:`read_split_lists` takes the lists once it exists, so
  another process loading the folder meanwhile reads all of them or none.
  """
  files.make_workdir(directory)
  for split in sorted(split_files, key=lambda split: split == "train"):
    with files.atomic_open(directory / f"{split}.txt") as f:
      f.writelines(f"{path}\n" for path in split_files[split])


def read_split_lists(directory: pathlib.Path,
                     listing: Listing) -> dict[str, list[tuple[str, int]]] | None:
  """The splits written by an earlier run in this workdir, None if there are none; raises
  DataError if they name files the root no longer has."""
  if not (directory / "train.txt").is_file():
    return None
  labels = listing.labels_by_path()
  splits, missing = {}, []
  for split in SPLITS:
    text = (directory / f"{split}.txt").read_text(encoding="utf-8")
    paths = [line for line in text.split("\n") if line]
    missing += [p for p in paths if p not in labels]
    splits[split] = paths
  if missing:
    raise _problem(f"files listed in {directory} (this run's splits) missing from "
                   f"{listing.root}", missing,
                   "Restore them, or start a new run in another --workdir.")
  added = len(labels) - sum(len(paths) for paths in splits.values())
  if added:
    logging.warning("%s: %d image files are not in this run's split lists in %s (added since "
                    "it began); they are not used. Start a new run in another --workdir to "
                    "use them.", listing.root, added, directory)
  return {split: [(p, labels[p]) for p in paths] for split, paths in splits.items()}


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


def _decoded(root: pathlib.Path, paths: list[str], size: int):
  """Yields ``(pixels or None, error or None)`` per path, in order: in a pool of one process
  per core (spawned, as the caller runs threads), or here for a few files."""
  jobs = [str(root / path) for path in paths]
  if len(jobs) < _PARALLEL_FROM:
    yield from (images.try_load_stored(job, size) for job in jobs)
    return
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=context) as pool:
    yield from pool.map(images.try_load_stored, jobs, itertools.repeat(size), chunksize=16)


def _decode_into(out: np.ndarray, root: pathlib.Path, paths: list[str], size: int,
                 progress: bool) -> dict[str, str]:
  """Decodes ``paths`` into the rows of ``out``; returns path -> why, for those that failed."""
  failed = {}
  results = tqdm.tqdm(_decoded(root, paths, size), total=len(paths), unit="image",
                      desc=f"decoding {root.name}", disable=not (progress and sys.stderr.isatty()))
  for i, (pixels, error) in enumerate(results):
    if error is None:
      out[i] = pixels
    else:
      failed[paths[i]] = error
  return failed


def decoded_images(root: pathlib.Path, paths: list[str], size: int,
                   cache_dir: pathlib.Path, progress: bool = True
                   ) -> tuple[np.ndarray, dict[str, str]]:
  """uint8 [len(paths), size, size, 3] (memory-mapped, read-only) and the files that could
  not be decoded (path -> why; their rows are zeros), from the cache or decoded into it."""
  key = cache_key(root, paths, size)
  array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
  if array_path.is_file() and meta_path.is_file():
    logging.info("%s: %d decoded images from the cache %s", root, len(paths), array_path)
    failed = json.loads(meta_path.read_text(encoding="utf-8"))["failed"]
    return np.load(array_path, mmap_mode="r"), failed
  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp_path = cache_dir / f".{key}.{os.getpid()}.npy.tmp"
  started = time.perf_counter()
  try:
    out = np.lib.format.open_memmap(tmp_path, "w+", np.uint8, (len(paths), size, size, 3))
    failed = _decode_into(out, root, paths, size, progress)
    out.flush()
    del out
    os.replace(tmp_path, array_path)
  finally:
    tmp_path.unlink(missing_ok=True)
  files.write_json(meta_path, {"root": str(root), "size": size, "files": len(paths),
                                   "failed": failed})  # Written last: marks the cache done.
  seconds = time.perf_counter() - started
  logging.info("%s: decoded %d images in %.1f s (%.0f images/s) to %s", root, len(paths),
               seconds, len(paths) / seconds, array_path)
  return np.load(array_path, mmap_mode="r"), failed


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


def load_folder(data_config: ml_collections.ConfigDict, *, stored_size: int, seed: int,
                splits_dir: pathlib.Path | None, progress: bool = True) -> Dataset:
  """The folder ``data_config.dir`` (a config's ``data`` section) as a Dataset with its own
  validation split, its images decoded at ``stored_size`` (:func:`stored_size`).

  Split lists are read from ``splits_dir`` if an earlier run wrote them there
  (:func:`write_split_lists` of ``Dataset.split_files``), else cut (seeded by ``seed``). Bad
  image files raise one DataError listing them, unless ``data.skip_bad_images``: then they are
  left out with a warning and named in ``Dataset.skipped``.
  """
  config = data_config
  listing = scan(config.dir)
  splits = read_split_lists(splits_dir, listing) if splits_dir else None
  if splits is None:
    splits = split_listing(listing, validation_split=config.validation_split,
                           test_split=config.test_split, seed=seed)
  _log_listing(listing, splits)
  if not splits["test"]:
    raise DataError(f"{listing.root} has no test images: add a test/ folder beside "
                         "train/, or set data.test_split > 0 to hold some out.")
  size = stored_size
  paths = sorted(path for files in splits.values() for path, _ in files)
  stream = _streams(len(paths), size, config)
  cache_dir = (pathlib.Path(config.cache_dir).expanduser() if config.cache_dir
               else default_cache_dir())
  pixels, failed = decoded_images(listing.root, paths, size, cache_dir, progress)
  if failed and not config.skip_bad_images:
    raise _problem("image files that cannot be read", [f"{p} ({why})" for p, why in failed.items()],
                   f"Replace or remove them, {_SKIP_FIX}.")
  if failed:
    logging.warning("%s: skipping %d image files that cannot be read: %s", listing.root,
                    len(failed), ", ".join(list(failed)[:_LISTED]))
  row = {path: i for i, path in enumerate(paths)}

  def to_split(files):
    kept = [(path, label) for path, label in files if path not in failed]
    rows = np.array([row[path] for path, _ in kept], np.int64)
    labels = np.array([label for _, label in kept], np.int32)
    if stream:
      return Split(RowView(pixels, rows), labels)
    return Split(np.asarray(pixels[rows]) if kept else np.zeros((0, size, size, 3),
                                                                     np.uint8), labels)

  # Training examples in a seeded random order, not by class, so that data.train_examples's
  # first N are a sample of every class.
  shuffled = np.random.default_rng(seed).permutation(len(splits["train"]))
  train = to_split([splits["train"][i] for i in shuffled])
  validation, test = to_split(splits["validation"]), to_split(splits["test"])
  names = listing.class_names
  # The files (each path's size and modification time) and which split each is in.
  identity = hashlib.sha256(json.dumps([cache_key(listing.root, paths, size), splits,
                                        sorted(failed)]).encode()).hexdigest()
  return Dataset(train, test, len(names), names, listing.root.name,
                      identity=f"folder sha256:{identity}", validation=validation,
                      skipped=tuple(sorted(failed)),
                      split_files={split: tuple(path for path, _ in files)
                                   for split, files in splits.items()})
