"""tljax.data.tfds: a prepared tensorflow-datasets copy read without network, and each way
preparing one can fail (offline, no TensorFlow, a failed download) as one message with the fix."""

import socket
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import extractor

from tljax.data import dataset, load
from tljax.data import tfds as tfds_source


def _no_network(*args, **kwargs):
  raise OSError("network is unreachable")


class TinyDigits(tfds.core.GeneratorBasedBuilder):
  """A three-class tfds dataset prepared locally; ``image`` is a plain tensor (PNG needs TF)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(5), "test": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((4, 4, 1), i, np.uint8), "label": i % 3}


def test_tfds_reads_a_prepared_copy_without_network(tmp_path, monkeypatch):
  monkeypatch.setattr(TinyDigits, "pkg_dir_path", tfds.core.Path(tmp_path))  # Its (absent) README.
  TinyDigits(data_dir=tmp_path / "tfds").download_and_prepare(file_format="array_record")
  monkeypatch.setattr(socket, "create_connection", _no_network)
  ds = load.idx_or_tfds("tiny_digits", tmp_path / "tfds")
  assert (ds.num_classes, ds.class_names) == (3, ("a", "b", "c"))
  assert ds.train.images.shape == (5, 4, 4) and ds.test.images.shape == (3, 4, 4)
  assert sorted(ds.train.images[:, 0, 0].tolist()) == [0, 1, 2, 3, 4]
  np.testing.assert_array_equal(ds.train.labels, ds.train.images[:, 0, 0] % 3)


class TrainOnlyDigits(TinyDigits):
  """TinyDigits with a train split alone: 9 examples, 3 of each class."""

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(9)}


def test_tfds_without_a_test_split_cuts_one_from_train_or_names_its_splits(tmp_path,
                                                                           monkeypatch):
  monkeypatch.setattr(TrainOnlyDigits, "pkg_dir_path", tfds.core.Path(tmp_path))
  TrainOnlyDigits(data_dir=tmp_path / "tfds").download_and_prepare(file_format="array_record")
  ds = load.idx_or_tfds("train_only_digits", tmp_path / "tfds", test_split=0.34, seed=3)
  # One of each class's three examples, chosen as a folder without test/ is cut.
  assert sorted(ds.test.labels.tolist()) == [0, 1, 2] and len(ds.train) == 6
  np.testing.assert_array_equal(ds.train.labels, ds.train.images[:, 0, 0] % 3)
  assert sorted([*ds.train.images[:, 0, 0], *ds.test.images[:, 0, 0]]) == list(range(9))
  again = tfds_source.load_tfds("train_only_digits", tmp_path / "tfds", test_split=0.34, seed=3)
  np.testing.assert_array_equal(again.test.images, ds.test.images)  # Seeded.
  assert ds.identity.endswith("train=6 test=3 (test cut from train at 0.34, seed 3)")
  with pytest.raises(dataset.DataError, match=(
      r"^train_only_digits has the splits \['train'\]; tljax trains on 'train' and tests on "
      r"'test', or on data.test_split of train where there is no 'test': set data.test_split "
      r"> 0 \(e.g. 0.1\)\.$")):
    tfds_source.load_tfds("train_only_digits", tmp_path / "tfds", test_split=0.0, seed=3)


def _tensorflow_installed(monkeypatch):
  """As where TensorFlow is installed, which preparing most tfds datasets needs."""
  monkeypatch.setattr(tfds_source, "needs_tensorflow_to_prepare", lambda builder: False)


def test_tfds_mnist_under_mock_data(tmp_path, monkeypatch):
  _tensorflow_installed(monkeypatch)  # mock_data stands in for the prepare step.
  monkeypatch.setattr(tfds_source, "host_reachable", lambda host, port: True)
  with tfds.testing.mock_data(num_examples=6):
    ds = load.idx_or_tfds("mnist", tmp_path)  # An empty folder is a tfds data_dir.
  assert (ds.name, ds.num_classes, ds.class_names) == ("mnist", 10, tuple("0123456789"))
  for split in (ds.train, ds.test):
    assert split.images.shape == (6, 28, 28) and split.images.dtype == np.uint8
    assert split.labels.dtype == np.int32 and split.labels.shape == (6,)
    assert 0 <= split.labels.min() and split.labels.max() < 10


def test_tfds_offline_fails_fast_with_the_fix(tmp_path, monkeypatch):
  _tensorflow_installed(monkeypatch)
  monkeypatch.setattr(socket, "create_connection", _no_network)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: pytest.fail("must not start a download offline"))
  start = time.perf_counter()
  with pytest.raises(dataset.DataError) as e:
    load.idx_or_tfds("fashion_mnist", tmp_path)
  assert time.perf_counter() - start < 5
  message = str(e.value)
  for part in ("fashion_mnist", str(tmp_path), "could not be reached", "--config.data.dir=",
               "train-images-idx3-ubyte", "array_record"):
    assert part in message


def test_tfds_failed_download_is_explained(tmp_path, monkeypatch):
  _tensorflow_installed(monkeypatch)
  monkeypatch.setattr(tfds_source, "host_reachable", lambda host, port: True)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: _no_network())
  with pytest.raises(dataset.DataError, match="downloading it failed: network is unreachable.*"
                                           "--config.data.dir="):
    tfds_source.load_tfds("mnist", tmp_path)


# All need TensorFlow to read their downloads; tf_flowers, patch_camelyon and imagenet_resized
# do not call it in their own code, and the last two hand NumPy images to tfds to encode.
@pytest.mark.parametrize("name", ["mnist", "cifar10", "tf_flowers", "patch_camelyon",
                                  "imagenet_resized/32x32"])
def test_tfds_without_tensorflow_says_so_before_any_download(name, tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, "host_reachable", lambda host, port: pytest.fail("probed"))
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: pytest.fail("must not start a download"))
  with pytest.raises(dataset.DataError) as e:
    tfds_source.load_tfds(name, tmp_path)
  message = str(e.value)
  assert f"{name} is not prepared in {tmp_path}" in message
  assert "needs TensorFlow to prepare it, which is not installed" in message
  assert "pip install tensorflow-cpu" in message and "--config.data.dir=" in message
  assert ("leave data.dir empty" in message) == (name == "mnist")


def test_tfds_builders_from_elsewhere_are_prepared_without_tensorflow(tmp_path, monkeypatch):
  monkeypatch.setattr(TinyDigits, "pkg_dir_path", tfds.core.Path(tmp_path))  # Its (absent) README.
  monkeypatch.setattr(tfds_source, "host_reachable", lambda host, port: True)
  ds = tfds_source.load_tfds("tiny_digits", tmp_path / "tfds")
  assert ds.train.images.shape == (5, 4, 4) and ds.test.images.shape == (3, 4, 4)


class TinyPhotos(TinyDigits):
  """As TinyDigits, with ``image`` an Image feature given NumPy arrays, which tfds encodes to
  PNG with TensorFlow."""

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(4, 4, 1)),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))


def test_tfds_builders_from_elsewhere_that_need_tensorflow_say_so(tmp_path, monkeypatch):
  monkeypatch.setattr(TinyPhotos, "pkg_dir_path", tfds.core.Path(tmp_path))
  monkeypatch.setattr(tfds_source, "host_reachable", lambda host, port: True)
  with pytest.raises(dataset.DataError, match="tiny_photos is not prepared in .* needs TensorFlow "
                                           "to prepare it, which is not installed"):
    tfds_source.load_tfds("tiny_photos", tmp_path / "tfds")


# How tensorflow-datasets raises a failed TensorFlow import: as is from a builder's own code,
# wrapped when extracting a download, re-raised with name None when encoding an image.
def _as_is(e):
  raise e


def _extracting(e):
  raise extractor.ExtractError(f"Error while extracting cifar-10-python.tar.gz: {e}") from e


def _encoding(e):
  tfds.core.utils.reraise(e, prefix="Failed to encode example:\n{'image': ...}\n")


@pytest.mark.parametrize("reraise", [_as_is, _extracting, _encoding])
def test_tfds_tensorflow_import_during_prepare_becomes_the_same_message(reraise, tmp_path,
                                                                        monkeypatch):
  _tensorflow_installed(monkeypatch)
  monkeypatch.setattr(tfds_source, "host_reachable", lambda host, port: True)

  def prepare(*args, **kwargs):
    try:  # As tensorflow-datasets' lazy import of TensorFlow fails.
      raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    except ModuleNotFoundError as e:
      reraise(e)

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
  with pytest.raises(dataset.DataError, match="needs TensorFlow to prepare it") as e:
    tfds_source.load_tfds("cifar10", tmp_path)
  assert e.value.__cause__ is None and e.value.__suppress_context__


def test_tfds_other_import_errors_during_prepare_stay_as_they_are(tmp_path, monkeypatch):
  _tensorflow_installed(monkeypatch)
  monkeypatch.setattr(tfds_source, "host_reachable", lambda host, port: True)

  def prepare(*args, **kwargs):
    raise ModuleNotFoundError("No module named 'tensorflow_io'", name="tensorflow_io")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
  with pytest.raises(ModuleNotFoundError, match="tensorflow_io"):
    tfds_source.load_tfds("cifar10", tmp_path)


def test_tfds_unknown_name_suggests_valid_ones(tmp_path):
  with pytest.raises(dataset.DataError, match=r"Unknown dataset 'mnistt'.*did you mean mnist"):
    tfds_source.load_tfds("mnistt", tmp_path)
