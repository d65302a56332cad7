"""tljax.data.load: which reader a config's data.source and data.dir pick, and the train /
validation / test splits load_splits cuts."""

import pathlib

import numpy as np
import pytest

from configs import default
from helpers import folder_config, make_folder, tiny_config, write_idx_folder
from tljax.data import dataset, idx, load

# ---------------------------------------------------------------------------------------------
# Source selection.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def readers(monkeypatch):
  """Every reader load.py calls, replaced by one that records its call and returns its name."""
  calls = []
  monkeypatch.setattr(load.idx, "load_idx_folder", lambda path, name: (
      calls.append(("idx", str(path), name)) or "idx"))
  monkeypatch.setattr(load.idx, "fetch_idx", lambda name: (
      calls.append(("fetch_idx", name)) or pathlib.Path("/cache/datasets") / name))
  monkeypatch.setattr(load.tfds, "load_tfds", lambda name, data_dir, test_split, seed: (
      calls.append(("tfds", name, data_dir if data_dir is None else str(data_dir),
                    test_split, seed)) or "tfds"))
  monkeypatch.setattr(load.folder, "load_folder", lambda data_config, **kwargs: (
      calls.append(("folder", data_config.dir, kwargs["stored_size"], kwargs["splits_dir"]))
      or "folder"))
  return calls


@pytest.fixture
def dirs(tmp_path):
  """A folder of class folders, an IDX folder and an empty folder (a tfds data_dir)."""
  return {"photos": str(make_folder(tmp_path / "photos", {"a": 1, "b": 1})),
          "idx": str(write_idx_folder(tmp_path / "idx")),
          "empty": str((tmp_path / "empty").mkdir() or tmp_path / "empty")}


@pytest.mark.parametrize("source, data_dir, name, expected", [
    ("auto", "photos", "mnist", ("folder", "photos", 40, "splits")),
    ("auto", "idx", "digits", ("idx", "idx", "digits")),
    # A tfds dataset without a test split is cut as data.test_split and seed say.
    ("auto", "empty", "cifar10", ("tfds", "cifar10", "empty", 0.1, 0)),
    ("auto", "", "fashion_mnist", ("idx", "/cache/datasets/fashion_mnist", "fashion_mnist")),
    ("auto", "", "cifar10", ("tfds", "cifar10", None, 0.1, 0)),
    ("idx", "photos", "mnist", ("idx", "photos", "mnist")),   # Named: no detection.
    ("tfds", "idx", "mnist", ("tfds", "mnist", "idx", 0.1, 0)),
    ("tfds", "", "mnist", ("tfds", "mnist", None, 0.1, 0)),
    ("folder", "idx", "mnist", ("folder", "idx", 40, "splits")),
], ids=["auto_folder", "auto_idx", "auto_tfds", "auto_download", "auto_tfds_default",
        "idx", "tfds", "tfds_default", "folder"])
def test_source_picks_the_reader(source, data_dir, name, expected, readers, dirs, tmp_path):
  config = default.get_config()
  config.data.source, config.data.name = source, name
  config.data.dir = dirs.get(data_dir, data_dir)
  named = {**dirs, "splits": tmp_path / "run" / "splits"}
  reader, *arguments = expected
  assert load.load_dataset(config, tmp_path / "run") == reader
  assert readers[-1] == (reader, *(named.get(a, a) if isinstance(a, str) else a
                                   for a in arguments))
  assert [c[0] for c in readers] == (["fetch_idx", reader] if data_dir == "" and reader == "idx"
                                     else [reader])


def test_a_folder_without_a_workdir_has_no_split_lists(readers, dirs):
  config = folder_config(dirs["photos"], image_size=24)
  load.load_dataset(config)
  assert readers == [("folder", dirs["photos"], 24, None)]


def test_folder_source_without_a_dir_says_what_to_pass():
  config = default.get_config()
  config.data.source = "folder"
  with pytest.raises(dataset.DataError, match=r"data.source=folder needs --config.data.dir="):
    load.load_dataset(config)


def test_incomplete_idx_folder_names_missing_files(tmp_path):
  folder = write_idx_folder(tmp_path / "d")
  (folder / "t10k-images-idx3-ubyte").unlink()
  with pytest.raises(dataset.DataError, match=r"missing IDX files \['t10k-images-idx3-ubyte'\]"):
    load.idx_or_tfds("mnist", folder)


@pytest.mark.parametrize("data_dir", ["", "/nonexistent/tljax-data"])
def test_load_dataset_rejects_missing_data_dir(data_dir):
  with pytest.raises(dataset.DataError, match="is not a folder") as e:
    load.idx_or_tfds("mnist", data_dir)
  assert repr(data_dir) in str(e.value)

# ---------------------------------------------------------------------------------------------
# Splits.
# ---------------------------------------------------------------------------------------------


def test_load_splits_holds_out_the_last_fraction_of_the_examples_taken(tiny_idx_dir):
  config = tiny_config(tiny_idx_dir, **{"data.train_examples": 100,
                                        "data.validation_split": 0.25})
  ds, splits = load.load_splits(config)
  whole = idx.load_idx_folder(tiny_idx_dir, "mnist")
  assert ds.identity == whole.identity and list(splits) == ["train", "validation", "test"]
  assert [len(s) for s in splits.values()] == [75, 25, 40]
  np.testing.assert_array_equal(splits["train"].images, whole.train.images[:75])
  np.testing.assert_array_equal(splits["validation"].images, whole.train.images[75:100])
  np.testing.assert_array_equal(splits["validation"].labels, whole.train.labels[75:100])
  np.testing.assert_array_equal(splits["test"].labels, whole.test.labels)


def test_load_splits_keeps_a_folders_own_validation_split(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 5, "b": 5}, "train")
  make_folder(root, {"a": 1, "b": 2}, "val")
  make_folder(root, {"a": 2, "b": 1}, "test")
  config = folder_config(root, validation_split=0.5, train_examples=4)
  ds, splits = load.load_splits(config)
  assert [len(s) for s in splits.values()] == [4, 3, 3]
  assert splits["validation"] is ds.validation and splits["test"] is ds.test
  np.testing.assert_array_equal(splits["train"].labels, ds.train.labels[:4])
