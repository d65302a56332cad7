"""Folder datasets under faults: link loops, a damaged decoded cache, a full disk and SIGTERM
while decoding, leftovers of killed decodes, names the split lists cannot hold, tljax's own
folders inside the data folder, tiny classes, skipped images, huge images, old caches."""

import logging
import os
import pathlib
import warnings

import numpy as np
import pytest
from PIL import Image

from configs import default
from helpers import counting_decodes, load_folder, make_folder, write_image
from tljax.data import dataset, folder, images, load


def folder_config(root, **data_overrides):
  config = default.get_config()
  config.data.dir = str(root)
  config.data.cache_dir = str(pathlib.Path(root).parent / "cache")
  config.model.input_size = 32
  config.data.update(data_overrides)
  return config


# ---------------------------------------------------------------------------------------------
# Links.
# ---------------------------------------------------------------------------------------------


def test_link_loops_are_not_followed_and_links_out_still_are(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
  outside = make_folder(tmp_path / "more", {"a": 1})
  (root / "a" / "loop").symlink_to(root)              # Back to the root: b's images under a.
  (root / "b" / "self").symlink_to(root / "b")        # A loop on itself.
  (root / "a" / "more").symlink_to(outside / "a")     # Out of the tree: followed, once.
  (root / "b" / "more_again").symlink_to(outside / "a")
  (outside / "a" / "again").symlink_to(outside / "a")  # A loop outside the tree.
  listing = folder.scan(root)
  assert listing.files == {"train": [("a/000.png", 0), ("a/001.png", 0),
                                     ("a/more/000.png", 0), ("b/000.png", 1),
                                     ("b/001.png", 1)]}
  assert listing.ignored == {
      "link back into the data folder, not followed": ["a/loop", "b/self"],
      "folder reached again through a link, not followed": ["a/more/again", "b/more_again"]}


def test_a_link_loop_is_logged(tmp_path, caplog):
  root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
  (root / "a" / "loop").symlink_to("..")
  caplog.set_level(logging.INFO)
  ds = load_folder(folder_config(root))
  assert len(ds.train) + len(ds.validation) + len(ds.test) == 10
  assert "ignored 1 files (link back into the data folder, not followed), e.g. a/loop" in (
      caplog.text)


# ---------------------------------------------------------------------------------------------
# Names the split lists cannot hold.
# ---------------------------------------------------------------------------------------------


def test_a_file_name_with_a_line_break_or_not_utf8_is_refused(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
  write_image(root / "a" / "two\nlines.png")
  write_image(pathlib.Path(os.fsdecode(os.fsencode(root / "b") + b"/caf\xe9.png")))
  with pytest.raises(dataset.DataError) as e:
    folder.scan(root)
  assert str(e.value) == (
      "2 file or folder names with a line break or bytes that are not UTF-8: "
      "'a/two\\nlines.png'; 'b/caf\\udce9.png'. Rename them: a run lists its files in "
      "<workdir>/splits/*.txt, one UTF-8 path a line, to resume on the same splits.")


# ---------------------------------------------------------------------------------------------
# tljax's own folders inside the data folder.
# ---------------------------------------------------------------------------------------------


def _fake_run(workdir: pathlib.Path, split_files=None) -> pathlib.Path:
  """A work directory with what a run writes: split lists, metrics and PNG plots."""
  folder.write_split_lists(workdir / "splits", split_files or {"train": ["a/000.png"]})
  (workdir / "metrics.jsonl").write_text("{}\n")
  write_image(workdir / "confusion_matrix.png")
  return workdir


def test_work_directories_and_the_cache_inside_the_folder_are_left_out(tmp_path, caplog):
  root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
  config = folder_config(root, cache_dir=str(root / "cache"))
  first = load_folder(config)                        # Makes d/cache.
  workdir = _fake_run(root / "runs" / "exp1", first.split_files)  # This run, to resume.
  _fake_run(root / "runs" / "exp0")                  # An earlier run.
  _fake_run(root / "a" / "run")                      # Inside a class folder.
  caplog.set_level(logging.INFO)
  ds = load.load_dataset(config, workdir)
  assert ds.class_names == ("a", "b") and ds.identity == first.identity
  listing = folder.scan(root, [workdir, root / "cache"])
  assert listing.ignored == {
      "work directory or decoded cache, left out": ["a/run", "cache", "runs/exp0",
                                                    "runs/exp1"],
      "folder holding only left-out folders, not a class": ["runs"]}
  assert "ignored 4 files (work directory or decoded cache, left out)" in caplog.text


def test_a_run_folder_beside_train_is_no_stray_split(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 3, "b": 3}, "train")
  make_folder(root, {"a": 1, "b": 1}, "test")
  _fake_run(root / "runs" / "exp0")
  listing = folder.scan(root)
  assert listing.layout == "splits" and sorted(listing.files) == ["test", "train"]
  assert listing.ignored["folder holding only left-out folders, not a class"] == ["runs"]


# ---------------------------------------------------------------------------------------------
# Tiny classes.
# ---------------------------------------------------------------------------------------------


def test_a_class_too_small_for_the_test_split_is_refused(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 6, "b": 1, "c": 4})
  with pytest.raises(dataset.DataError) as e:
    load_folder(folder_config(root))  # validation 0.2, test 0.1.
  assert str(e.value) == (
      "2 classes without an image in train or in test: b (1 images: train 1, validation 0, "
      "test 0); c (4 images: train 3, validation 1, test 0). Each class needs images to train "
      "on and to test on: add images to these classes (with data.validation_split=0.2 and "
      "data.test_split=0.1, a class needs at least 5), or remove their folders.")


def test_a_test_folder_without_a_class_is_refused(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 4, "b": 4}, "train")
  make_folder(root, {"a": 2}, "test")
  with pytest.raises(dataset.DataError, match=r"^1 classes without an image in train or in "
                     r"test: b \(4 images: train 3, validation 1, test 0\)\. Each class needs "
                     r"images to train on and to test on: add images to these classes, or"):
    load_folder(folder_config(root))


def test_a_class_without_a_validation_image_is_a_warning(tmp_path, caplog):
  root = make_folder(tmp_path / "d", {"a": 8, "b": 4})
  ds = load_folder(folder_config(root, validation_split=0.1, test_split=0.25))
  assert np.bincount(ds.validation.labels, minlength=2).tolist() == [1, 0]
  assert ("d: 1 classes have no validation image, so their validation accuracy is not "
          "measured: b (4 images: train 3, validation 0, test 1)") in caplog.text


def test_a_class_emptied_by_skipped_images_is_refused(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
  for i in range(5):
    (root / "b" / f"{i:03d}.png").write_bytes(b"")
  with pytest.raises(dataset.DataError, match=r"^1 classes without an image in train or in "
                     r"test: b \(0 images: train 0, validation 0, test 0\)"):
    load_folder(folder_config(root, skip_bad_images=True))


# ---------------------------------------------------------------------------------------------
# Skipped images and the split lists.
# ---------------------------------------------------------------------------------------------


def test_skipped_images_stay_out_of_the_split_lists_and_a_resume_repeats_the_run(
    tmp_path, monkeypatch, caplog):
  root = make_folder(tmp_path / "d", {"a": 8, "b": 8})
  (root / "a" / "005.png").write_text("not a png")
  splits_dir = tmp_path / "run" / "splits"
  config = folder_config(root, skip_bad_images=True)
  first = load_folder(config, splits_dir)
  assert first.skipped == ("a/005.png",) and first.split_files["skipped"] == ("a/005.png",)
  assert all("a/005.png" not in first.split_files[s] for s in folder.SPLITS)
  assert sum(len(first.split_files[s]) for s in folder.SPLITS) == 15
  folder.write_split_lists(splits_dir, first.split_files)
  assert "a/005.png" not in (splits_dir / "train.txt").read_text()
  assert (splits_dir / "skipped.txt").read_text() == "a/005.png\n"
  decoded = counting_decodes(monkeypatch)
  caplog.set_level(logging.INFO)
  again = load_folder(config, splits_dir)
  assert decoded == [] and "decoded images from the cache" in caplog.text  # The same cache.
  assert "not in this run's split lists" not in caplog.text
  assert again.identity == first.identity and again.skipped == first.skipped
  assert again.split_files == first.split_files
  np.testing.assert_array_equal(again.train.images, first.train.images)
  np.testing.assert_array_equal(again.train.labels, first.train.labels)


def test_a_resume_after_the_skipped_file_is_removed_is_the_same_run(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 8, "b": 8})
  (root / "a" / "005.png").write_text("not a png")
  splits_dir = tmp_path / "run" / "splits"
  config = folder_config(root, skip_bad_images=True)
  first = load_folder(config, splits_dir)
  folder.write_split_lists(splits_dir, first.split_files)
  (root / "a" / "005.png").unlink()
  config.data.skip_bad_images = False  # Nothing left to skip.
  again = load_folder(config, splits_dir)
  assert again.identity == first.identity and again.split_files == first.split_files
  np.testing.assert_array_equal(again.train.images, first.train.images)


# ---------------------------------------------------------------------------------------------
# Huge images.
# ---------------------------------------------------------------------------------------------


def test_a_large_image_decodes_without_pillows_warning_and_a_huge_one_is_a_bad_image(
    tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60)  # Warns above 60 pixels, refuses 120.
  large = write_image(tmp_path / "large.png", size=(8, 10))
  huge = write_image(tmp_path / "huge.png", size=(12, 12))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert images.load_stored(large, 8).shape == (8, 8, 3)
    assert images.load_image(large).shape == (8, 10, 3)
  assert [w.category for w in caught] == []
  pixels, cause = images.try_load_stored(str(huge), 8)
  assert pixels is None and cause == (
      "more than 120 pixels, Pillow's limit against decompression bombs (if it is a real "
      "photo, make it smaller)")
