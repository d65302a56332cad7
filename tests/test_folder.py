"""Folder datasets: layouts, class order, splits, the decoded cache, bad input, a short run."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import (REPO, folder_config, load_folder, make_folder, tiny_folder_config,
                     write_image)
from tljax import checks, train
from tljax.data import dataset, folder, images, load


# ---------------------------------------------------------------------------------------------
# Scanning.
# ---------------------------------------------------------------------------------------------


def test_class_layout_nested_files_hidden_and_other_files(tmp_path):
  root = make_folder(tmp_path / "photos", {"cat": 2, "dog": 1})
  write_image(root / "cat" / "2021" / "summer" / "deep.jpg")
  (root / "cat" / ".DS_Store").write_bytes(b"x")
  (root / "dog" / "notes.txt").write_text("x")
  (root / ".hidden").mkdir()
  write_image(root / "dog" / ".thumbs" / "t.png")
  (root / "README.md").write_text("x")
  listing = folder.scan(root)
  assert listing.layout == "classes" and listing.class_names == ("cat", "dog")
  assert listing.files == {"train": [("cat/000.png", 0), ("cat/001.png", 0),
                                     ("cat/2021/summer/deep.jpg", 0), ("dog/000.png", 1)]}
  assert listing.ignored == {"hidden": [".hidden", "cat/.DS_Store", "dog/.thumbs"],
                             "not an image file": ["dog/notes.txt"],
                             "not in a class folder": ["README.md"]}


def test_split_layout_with_val_alias(tmp_path):
  root = make_folder(tmp_path / "d", {"b": 3, "a": 2}, "train")
  make_folder(root, {"a": 1, "b": 1}, "val")
  listing = folder.scan(root)
  assert listing.layout == "splits" and listing.class_names == ("a", "b")
  assert sorted(listing.files) == ["train", "validation"]
  assert listing.files["validation"] == [("val/a/000.png", 0), ("val/b/000.png", 1)]


def test_class_names_are_the_sorted_folder_names(tmp_path):
  root = make_folder(tmp_path / "d", {"zebra": 1, "Apple": 1, "mango": 1, "10": 1, "9": 1})
  assert folder.scan(root).class_names == ("10", "9", "Apple", "mango", "zebra")


def test_is_image_folder(tmp_path, tiny_idx_dir):
  assert folder.is_image_folder(make_folder(tmp_path / "a", {"x": 1, "y": 1}))
  assert folder.is_image_folder(make_folder(tmp_path / "b", {"x": 1, "y": 1}, "train"))
  assert not folder.is_image_folder(tiny_idx_dir)
  assert not folder.is_image_folder(tmp_path / "missing")


def test_clothing_small_listing(shared_dir):
  listing = folder.scan(shared_dir / "data" / "clothing-small")
  assert listing.layout == "splits" and len(listing.class_names) == 10
  assert listing.class_names[:3] == ("dress", "hat", "longsleeve")
  assert {k: len(v) for k, v in listing.files.items()} == {
      "train": 3068, "validation": 341, "test": 372}


# ---------------------------------------------------------------------------------------------
# Splits.
# ---------------------------------------------------------------------------------------------


def test_split_is_stratified_seeded_and_complete(tmp_path):
  listing = folder.scan(make_folder(tmp_path / "d", {"a": 20, "b": 10}))
  splits = folder.split_listing(listing, validation_split=0.2, test_split=0.1, seed=0)
  counts = {s: np.bincount([l for _, l in files], minlength=2).tolist()
            for s, files in splits.items()}
  assert counts == {"train": [14, 7], "validation": [4, 2], "test": [2, 1]}
  every = sorted(p for files in splits.values() for p in files)
  assert every == listing.files["train"]
  assert splits == folder.split_listing(listing, validation_split=0.2, test_split=0.1, seed=0)
  assert splits != folder.split_listing(listing, validation_split=0.2, test_split=0.1, seed=1)


def test_existing_split_folders_are_kept_and_missing_ones_cut(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 10, "b": 10}, "train")
  make_folder(root, {"a": 2, "b": 2}, "test")
  splits = folder.split_listing(folder.scan(root), validation_split=0.3, test_split=0.5,
                                seed=0)
  assert [len(splits[s]) for s in folder.SPLITS] == [14, 6, 4]
  assert all(p.startswith("test/") for p, _ in splits["test"])


def test_split_lists_are_written_and_reused(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 6, "b": 6})
  splits_dir = tmp_path / "run" / "splits"
  first = load_folder(folder_config(root), splits_dir)
  assert not splits_dir.exists()  # The run writes them, once its config has passed.
  folder.write_split_lists(splits_dir, first.split_files)
  train_list = (splits_dir / "train.txt").read_text().split()
  assert len(train_list) == len(first.train) == 8 and "a/000.png" in "".join(
      (splits_dir / f"{s}.txt").read_text() for s in folder.SPLITS)
  config = folder_config(root)
  config.seed = 5  # A resumed run reads the lists back, whatever would be cut now.
  again = load_folder(config, splits_dir)
  assert again.split_files == first.split_files
  assert sorted(map(bytes, again.train.images)) == sorted(map(bytes, first.train.images))
  os.remove(root / train_list[0])
  with pytest.raises(dataset.DataError, match=r"1 files listed in .*splits.* missing") as e:
    load_folder(config, splits_dir)
  assert train_list[0] in str(e.value) and "another --workdir" in str(e.value)


def test_train_list_is_written_last(tmp_path, monkeypatch):
  """Another process takes the lists once train.txt exists: the others must be there."""
  written, atomic_open = [], folder.files.atomic_open

  def recording(path, *args):
    written.append(pathlib.Path(path).name)
    return atomic_open(path, *args)

  monkeypatch.setattr(folder.files, "atomic_open", recording)
  folder.write_split_lists(tmp_path, {"train": ["a/0.png"], "validation": ["a/1.png"],
                                      "test": ["b/0.png"]})
  assert written == ["validation.txt", "test.txt", "train.txt"]


# ---------------------------------------------------------------------------------------------
# The dataset.
# ---------------------------------------------------------------------------------------------


def test_dataset_images_labels_and_stored_size(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 5, "b": 5}, "train")
  make_folder(root, {"a": 2, "b": 1}, "valid")
  make_folder(root, {"a": 1, "b": 2}, "test")
  ds = load_folder(folder_config(root), None)
  assert ds.class_names == ("a", "b") and ds.name == "d"
  assert ds.train.images.shape == (10, 40, 40, 3)  # 32 * 8/7 -> 40.
  assert ds.validation.labels.tolist() == [0, 0, 1] and ds.test.labels.tolist() == [0, 1, 1]
  np.testing.assert_array_equal(ds.test.images[2], images.load_stored(
      root / "test" / "b" / "001.png", 40))
  # Training examples come in a seeded random order, so that the first N hold every class.
  assert sorted(ds.train.labels.tolist()) == [0] * 5 + [1] * 5
  assert set(ds.train.labels[:4].tolist()) == {0, 1}
  train_paths = [p for p, _ in folder.scan(root).files["train"]]
  order = np.random.default_rng(0).permutation(10)
  np.testing.assert_array_equal(ds.train.images[0], images.load_stored(
      root / train_paths[order[0]], 40))


def test_too_big_for_memory_without_streaming_is_refused_before_decoding(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
  config = folder_config(root, max_memory_gb=1e-5, test_split=0.2, stream="off")
  with pytest.raises(dataset.DataError, match=r"6 decoded images at 40x40 need .* "
                     r"data.max_memory_gb=1e-05, and data.stream=off. Set data.stream=auto"):
    load_folder(config, None)
  assert not (tmp_path / "d_cache").exists()


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


def _corrupt(path: pathlib.Path, kind: str) -> None:
  if kind == "zero_bytes":
    path.write_bytes(b"")
  elif kind == "text_named_jpg":
    path.write_text("not a photo")
  elif kind == "truncated":
    noise = np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)
    Image.fromarray(noise).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("kind, cause", [
    ("zero_bytes", "empty file"), ("text_named_jpg", "not an image Pillow can identify"),
    ("truncated", "cannot be read as an image"), ("unreadable", "Permission denied")])
def test_bad_image_is_named_or_skipped(tmp_path, kind, cause, monkeypatch):
  root = make_folder(tmp_path / "d", {"a": 4, "b": 4}, ext="jpg")
  if kind == "unreadable":  # As for a user without read permission (tests run as root).
    unreadable, open_image = root / "a" / "002.jpg", Image.open

    def refuse(path, *args, **kwargs):
      if pathlib.Path(path) == unreadable:
        raise PermissionError(13, "Permission denied", str(path))
      return open_image(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refuse)
  else:
    _corrupt(root / "a" / "002.jpg", kind)
  config = folder_config(root, validation_split=0.25, test_split=0.25)
  with pytest.raises(dataset.DataError, match=rf"^1 image files that cannot be read: "
                     rf"a/002.jpg \({cause}.*Replace or remove them, or pass "
                     r"--config.data.skip_bad_images=true") as e:
    load_folder(config, None)
  assert "\n" not in str(e.value)
  config.data.skip_bad_images = True
  ds = load_folder(config, None)
  assert ds.skipped == ("a/002.jpg",)
  assert len(ds.train) + len(ds.validation) + len(ds.test) == 7


def test_many_bad_images_list_ten_and_the_count(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 14, "b": 2})
  for i in range(12):
    (root / "a" / f"{i:03d}.png").write_bytes(b"")
  with pytest.raises(dataset.DataError, match=r"^12 image files .*a/009.png \(empty file "
                     r"\(0 bytes\)\); \.\.\. and 2 more\. Replace") as e:
    load_folder(folder_config(root), None)
  assert "a/010.png" not in str(e.value)


@pytest.mark.parametrize("build, message", [
    (lambda r: make_folder(r, {"a": 2, "c": 2}) and (r / "b").mkdir(),
     r"^1 class folders without images: d/b\. Put images in them or remove them\."),
    (lambda r: make_folder(r, {"only": 3}), r"found 1 class folder \(only\); a classifier "
     "needs at least two"),
    (lambda r: (r / "a").mkdir(parents=True) or (r / "a" / "x.txt").write_text("x"),
     r"holds no images \(\.jpg.*Put each class's images in .*/d/<class>/"),
    (lambda r: make_folder(r, {"a": 2, "b": 2}, "train") and make_folder(r, {"c": 1}, "test"),
     r"^1 class folders with no counterpart in train/: test/c\. The classes are train/'s "
     r"folders \(a, b\)"),
    (lambda r: make_folder(r, {"a": 2, "b": 2}, "train") and make_folder(r, {"a": 1}, "val")
     and make_folder(r, {"a": 1}, "validation"), "has 2 validation folders"),
    (lambda r: make_folder(r, {"a": 2, "b": 2}, "train") and make_folder(r, {"a": 1}, "extra"),
     r"^1 folders in .* beside train/ that are no split: extra\."),
], ids=["empty_class", "single_class", "no_images", "class_not_in_train", "two_val_folders",
        "stray_folder"])
def test_bad_folder_layout_is_one_message(tmp_path, build, message):
  build(tmp_path / "d")
  with pytest.raises(dataset.DataError, match=message) as e:
    load_folder(folder_config(tmp_path / "d"), None)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("unreadable", [".", "b/nested"])
def test_an_unreadable_folder_is_one_message(tmp_path, monkeypatch, unreadable):
  root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
  write_image(root / "b" / "nested" / "000.png")
  refused = os.path.normpath(root / unreadable)
  scandir = os.scandir

  def guarded_scandir(path="."):  # File modes do not stop root, who runs the tests.
    if os.path.normpath(path) == refused:
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return scandir(path)

  monkeypatch.setattr(os, "scandir", guarded_scandir)
  config = folder_config(root)
  with pytest.raises(dataset.DataError) as e:
    load.load_dataset(config)  # data.source=auto looks into the folder first.
  assert str(e.value) == (f"{refused}: cannot be read (Permission denied); check its "
                          "permissions and that the storage holding it is reachable.")


def test_a_bad_setting_on_a_folder_leaves_no_workdir(tmp_path):
  config = tiny_folder_config(make_folder(tmp_path / "d", {"a": 10, "b": 10}))
  config.phases[1].rules = ("freeze:.*",)
  with pytest.raises(checks.ConfigError, match="freeze every parameter"):
    train.run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_main_exits_2_on_a_bad_image_and_keeps_the_workdir(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
  (root / "b" / "001.png").write_text("not a png")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  result = subprocess.run(
      [sys.executable, "main.py", "--config=configs/default.py", f"--workdir={workdir}",
       f"--config.data.dir={root}", f"--config.data.cache_dir={tmp_path / 'cache'}",
       "--config.model.weights=none"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2, result.stderr
  assert "1 image files that cannot be read: b/001.png" in result.stderr
  assert "Traceback" not in result.stderr
  assert (workdir / "notes.txt").read_text() == "mine"
  assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# A short run.
# ---------------------------------------------------------------------------------------------


def test_run_on_a_tiny_folder(tiny_folder_run):
  _, workdir, summary = tiny_folder_run
  assert summary["class_names"] == ["blue", "green", "red"]
  assert summary["split_sizes"] == {"train": 18, "validation": 9, "test": 9}
  assert summary["skipped_images"] == [] and summary["test_examples"] == 9
  assert json.loads((workdir / "summary.json").read_text())["dataset"] == "photos"
  assert len((workdir / "splits" / "test.txt").read_text().split()) == 9
  head, fine_tune = summary["phases"]
  assert head["cached_prefix"] and fine_tune["cached_prefix"] is None  # It augments.
  assert (workdir / "confusion_matrix.png").stat().st_size > 0
