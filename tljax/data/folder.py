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
``<workdir>/splits/<split>.txt`` and read back by a resumed run. The images are decoded once into
a memory-mapped disk cache (:mod:`tljax.data.decoded_cache`); a dataset larger than
``data.max_memory_gb`` streams from it.
"""

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from tljax import files
from tljax.data import decoded_cache, images
from tljax.data.dataset import Dataset, DataError, RowView, Split, unreadable

SPLITS = ("train", "validation", "test")
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val", "valid"),
                 "test": ("test",)}
STORED_MARGIN = 8 / 7       # The stored side over model.input_size: room for crops (0.875).
_LISTED = 10                # Offending paths named in one message.
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
# The dataset.
# ---------------------------------------------------------------------------------------------


def stored_size(image_size: int, input_size: int) -> int:
  """The side of the square images in the cache: ``image_size`` (``data.image_size``), or
  (0) the model's ``input_size`` times 8/7 rounded up to a multiple of 8 (160 -> 184)."""
  if image_size:
    return image_size
  return 8 * math.ceil(input_size * STORED_MARGIN / 8)


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
               else decoded_cache.default_cache_dir())
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
  pixels, failed = decoded_cache.decoded_images(listing.root, paths, size, cache_dir, progress)
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
  identity = hashlib.sha256(json.dumps([decoded_cache.cache_key(listing.root, used, size), splits,
                                        skipped]).encode()).hexdigest()
  split_files = {split: tuple(path for path, _ in files) for split, files in splits.items()}
  if skipped:
    split_files["skipped"] = tuple(skipped)
  return Dataset(train, test, len(names), names, listing.root.name,
                      identity=f"folder sha256:{identity}", validation=validation,
                      skipped=tuple(skipped), split_files=split_files)
