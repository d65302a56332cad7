"""Data: IDX and tfds sources, Keras's validation split, preprocessing, augmentation, order."""

import gzip
import hashlib
import pathlib
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import extractor

from tljax import download
from tljax.data import dataset, idx, load, sources, transforms
from tljax.data import tfds as tfds_source


def write_idx(path, array, magic=None):
  """Writes ``array`` (uint8) as an IDX file, gzipped if ``path`` ends in .gz."""
  magic = magic if magic is not None else 0x800 + array.ndim
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  payload = header + array.astype(np.uint8).tobytes()
  (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(payload)
  return path


def small_split(n, h=4, w=4):
  return dataset.Split((np.arange(n * h * w) % 256).astype(np.uint8).reshape(n, h, w),
                    np.arange(n, dtype=np.int32))


def keras_validation_split(split, fraction, monkeypatch):
  """``model.fit(validation_split=fraction)``'s own cut of ``(images, labels)``."""
  monkeypatch.setenv("KERAS_BACKEND", "jax")
  from keras.src.trainers.data_adapters import array_slicing  # After KERAS_BACKEND is set.
  return array_slicing.train_validation_split((split.images, split.labels), fraction)


def tf_bilinear_resize(x_NHWC, out_h, out_w):
  """NumPy ``tf.image.resize(method="bilinear")``: half-pixel centers, clamped, no antialias."""
  def axis(n_in, n_out):
    centre = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    floor = np.floor(centre)
    lower = np.maximum(floor, 0).astype(int)
    upper = np.minimum(np.ceil(centre), n_in - 1).astype(int)
    return lower, upper, centre - floor

  y0, y1, wy = axis(x_NHWC.shape[1], out_h)
  x0, x1, wx = axis(x_NHWC.shape[2], out_w)
  x = x_NHWC.astype(np.float64)
  wx = wx[None, None, :, None]
  top = x[:, y0][:, :, x0] + (x[:, y0][:, :, x1] - x[:, y0][:, :, x0]) * wx
  bottom = x[:, y1][:, :, x0] + (x[:, y1][:, :, x1] - x[:, y1][:, :, x0]) * wx
  return top + (bottom - top) * wy[None, :, None, None]


# ---------------------------------------------------------------------------------------------
# IDX files.
# ---------------------------------------------------------------------------------------------


def test_mnist_idx_folder(mnist_dir):
  ds = load.idx_or_tfds("mnist", str(mnist_dir))
  assert (ds.name, ds.num_classes, ds.class_names) == ("mnist", 10, tuple("0123456789"))
  assert ds.train.images.shape == (60000, 28, 28) and ds.train.images.dtype == np.uint8
  assert ds.test.images.shape == (10000, 28, 28)
  assert ds.train.labels.dtype == np.int32 and ds.train.labels.shape == (60000,)
  assert ds.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
  assert ds.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
  assert np.bincount(ds.train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                     6265, 5851, 5949]
  assert ds.train.images.max() == 255 and ds.train.images.min() == 0


def test_fashion_mnist_idx_folder(fashion_mnist_dir):
  ds = load.idx_or_tfds("fashion_mnist", fashion_mnist_dir)
  assert ds.class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                            "Shirt", "Sneaker", "Bag", "Ankle boot")
  assert ds.train.images.shape == (60000, 28, 28) and ds.test.images.shape == (10000, 28, 28)
  assert ds.train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
  assert np.bincount(ds.train.labels).tolist() == [6000] * 10
  assert np.bincount(ds.test.labels).tolist() == [1000] * 10


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
  images = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  labels = np.array([3, 1], np.uint8)
  np.testing.assert_array_equal(idx.read_idx(write_idx(tmp_path / f"i{suffix}", images)), images)
  np.testing.assert_array_equal(idx.read_idx(write_idx(tmp_path / f"l{suffix}", labels)), labels)


def test_read_idx_bad_magic_names_path_and_magics(tmp_path):
  path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 2, 2)), magic=0x0D03)
  with pytest.raises(dataset.DataError, match="0x00000803") as e:
    idx.read_idx(path)
  assert str(path) in str(e.value) and "0x00000d03" in str(e.value)
  assert "train-labels-idx1-ubyte.gz" in str(e.value)


def test_read_idx_gzip_without_suffix_says_so(tmp_path):
  path = write_idx(tmp_path / "x.gz", np.zeros((2,)))
  path = path.rename(tmp_path / "x")
  with pytest.raises(dataset.DataError, match=r"name it \*\.gz"):
    idx.read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_truncated_payload(tmp_path, suffix):
  path = tmp_path / f"images{suffix}"
  write_idx(path, np.zeros((3, 4, 4)))
  raw = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
  truncated = raw[:-5]
  path.write_bytes(gzip.compress(truncated) if suffix else truncated)
  with pytest.raises(dataset.DataError, match=r"call for 48 bytes of data, found 43") as e:
    idx.read_idx(path)
  assert str(path) in str(e.value)


def test_read_idx_truncated_gzip_stream(tmp_path):
  path = write_idx(tmp_path / "labels.gz", np.arange(200) % 10)
  path.write_bytes(path.read_bytes()[:-20])
  with pytest.raises(dataset.DataError, match="cannot be decompressed") as e:
    idx.read_idx(path)
  assert str(path) in str(e.value)


def test_read_idx_truncated_header(tmp_path):
  path = tmp_path / "images"
  path.write_bytes((0x803).to_bytes(4, "big") + b"\0\0\0\2")
  with pytest.raises(dataset.DataError, match="truncated IDX header: expected 16 bytes, found 8"):
    idx.read_idx(path)


def write_idx_folder(folder, n_train=5, n_test=3, train_labels=None):
  folder.mkdir(exist_ok=True)
  labels = train_labels if train_labels is not None else np.arange(n_train) % 3
  write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((n_train, 4, 4)))
  write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
  write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((n_test, 4, 4)))  # Plain works too.
  write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 3)
  return folder


def test_idx_folder_of_another_dataset_numbers_its_classes(tmp_path):
  ds = load.idx_or_tfds("digits3", write_idx_folder(tmp_path / "d"))
  assert (ds.num_classes, ds.class_names, len(ds.train), len(ds.test)) == (3, ("0", "1", "2"),
                                                                           5, 3)


def test_idx_count_mismatch(tmp_path):
  folder = write_idx_folder(tmp_path / "d", train_labels=np.zeros(4))
  with pytest.raises(dataset.DataError, match="holds 5 images but .* holds 4 labels"):
    idx.load_idx_folder(folder, "mnist")


def test_idx_label_beyond_the_named_dataset(tmp_path):
  folder = write_idx_folder(tmp_path / "d", train_labels=np.array([0, 1, 2, 3, 10]))
  with pytest.raises(dataset.DataError, match="label 10 found, but mnist has 10 classes"):
    idx.load_idx_folder(folder, "mnist")


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
# tensorflow-datasets.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# IDX downloads.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_downloads_are_the_files_tfds_checks(name):
  import tensorflow_datasets
  listing = (pathlib.Path(tensorflow_datasets.__file__).parent / "url_checksums" /
             f"{name}.txt").read_text().split("\n")
  published = {url: sha256 for url, _, sha256, _ in (line.split("\t") for line in listing if line)}
  assert {url: sha256 for url, sha256 in idx.idx_downloads(name).values()} == published


def test_idx_checksums_match_the_original_files_in_shared(mnist_dir):
  # The shared copy's train images are a rebuild (see ../shared/README.md); the rest are
  # the original files.
  for file, (_, sha256) in idx.idx_downloads("mnist").items():
    if file != "train-images-idx3-ubyte.gz":
      assert download.sha256_of(mnist_dir / file) == sha256


@pytest.fixture
def idx_mirror(server, tiny_idx_dir, monkeypatch):
  """``server`` as $TLJAX_DATA_MIRROR serving tiny_idx_dir as "mnist", with its checksums."""
  files = {f"{stem}.gz": (tiny_idx_dir / f"{stem}.gz").read_bytes() for stem in idx.IDX_FILES}
  server.files.update({f"/mnist/{name}": body for name, body in files.items()})
  shas = tuple(hashlib.sha256(files[f"{stem}.gz"]).hexdigest() for stem in idx.IDX_FILES)
  monkeypatch.setitem(idx.IDX_SOURCES, "mnist", ("https://unused.invalid/", shas))
  monkeypatch.setenv("TLJAX_DATA_MIRROR", server.url)
  return server


def test_fetch_idx_downloads_once_and_replaces_a_damaged_file(idx_mirror, tmp_path,
                                                              monkeypatch):
  monkeypatch.setenv("TLJAX_CACHE", str(tmp_path))
  ds = load.idx_or_tfds("mnist", None)
  folder = tmp_path / "datasets" / "mnist"
  assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.gz" for s in idx.IDX_FILES)
  assert (len(ds.train), len(ds.test), ds.class_names) == (160, 40, tuple("0123456789"))
  assert sorted(idx_mirror.requests) == sorted(f"/mnist/{s}.gz" for s in idx.IDX_FILES)
  idx_mirror.requests.clear()
  load.idx_or_tfds("mnist", None)
  assert idx_mirror.requests == []
  (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"damaged")
  load.idx_or_tfds("mnist", None)
  assert idx_mirror.requests == ["/mnist/t10k-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("fault, expected", [
    ("404", r"/mnist/t10k-images-idx3-ubyte.gz answered HTTP 404"),
    ("dropped", r"the mnist download host 127.0.0.1:\d+ closed the connection before sending "
                r"t10k-images-idx3-ubyte.gz"),
    ("sha256", r"t10k-images-idx3-ubyte.gz downloaded with sha256 [0-9a-f]{64}, expected")])
def test_fetch_idx_failures_name_the_file_and_the_local_alternative(idx_mirror, tmp_path,
                                                                    fault, expected):
  path = "/mnist/t10k-images-idx3-ubyte.gz"
  if fault == "404":
    del idx_mirror.files[path]
  elif fault == "dropped":
    idx_mirror.dropped.add(path)
  else:
    idx_mirror.files[path] = b"tampered"
  with pytest.raises(dataset.DataError, match=expected + r".*--config.data.dir=<folder with the "
                     r"four files train-images-idx3-ubyte.gz"):
    idx.fetch_idx("mnist", tmp_path)
  assert not list((tmp_path / "datasets" / "mnist").glob("t10k-images*"))


def test_tfds_unknown_name_suggests_valid_ones(tmp_path):
  with pytest.raises(dataset.DataError, match=r"Unknown dataset 'mnistt'.*did you mean mnist"):
    tfds_source.load_tfds("mnistt", tmp_path)


# ---------------------------------------------------------------------------------------------
# Cutting splits.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [7, 10, 101, 60000])
@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.2, 0.3, 0.35, 0.7])
def test_holdout_split_matches_keras(n, fraction, monkeypatch):
  split = small_split(n)
  (x_train, y_train), (x_val, y_val) = keras_validation_split(split, fraction, monkeypatch)
  train, val = dataset.holdout_split(split, fraction)
  np.testing.assert_array_equal(train.images, x_train)
  np.testing.assert_array_equal(train.labels, y_train)
  np.testing.assert_array_equal(val.images, x_val)
  np.testing.assert_array_equal(val.labels, y_val)


def test_holdout_split_zero_and_bad_fractions():
  split = small_split(10)
  train, val = dataset.holdout_split(split, 0.0)
  assert train is split and len(val) == 0 and val.images.shape == (0, 4, 4)
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match=f"fraction {bad} must be in"):
      dataset.holdout_split(split, bad)


@pytest.mark.parametrize("n, fraction", [(3, 0.7), (1, 0.5), (10, 1e-17)])
def test_holdout_split_refuses_an_empty_side_like_keras(n, fraction, monkeypatch):
  split = small_split(n)
  with pytest.raises(ValueError, match="not sufficient"):
    keras_validation_split(split, fraction, monkeypatch)
  with pytest.raises(ValueError, match=f"{n} examples are too few"):
    dataset.holdout_split(split, fraction)


@pytest.mark.parametrize("n, expected", [(0, 10), (3, 3), (10, 10), (25, 10)])
def test_take(n, expected):
  split = dataset.take(small_split(10), n)
  assert len(split) == expected
  np.testing.assert_array_equal(split.labels, np.arange(expected))


def test_take_rejects_negative():
  with pytest.raises(ValueError, match="n=-1 must be >= 0"):
    dataset.take(small_split(3), -1)


def test_split_checks_its_arrays():
  with pytest.raises(ValueError, match="labels must be int32"):
    dataset.Split(np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.int64))
  with pytest.raises(ValueError, match="images must be uint8"):
    dataset.Split(np.zeros((3, 4), np.uint8), np.zeros(3, np.int32))


# ---------------------------------------------------------------------------------------------
# Preprocessing and augmentation.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 28, 28, 1), (2, 32, 32, 3)])
def test_preprocess_shapes_and_ranges(shape):
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  images[0] = 0
  images[1] = 255
  unit = jax.jit(lambda x: transforms.preprocess(x, size=40, scale="unit"))(images)
  symmetric = transforms.preprocess(images, size=40, scale="symmetric")
  assert unit.shape == symmetric.shape == (2, 40, 40, 3) and unit.dtype == jnp.float32
  np.testing.assert_allclose(unit[0], 0.0, rtol=0, atol=1e-6)
  np.testing.assert_allclose(unit[1], 1.0, rtol=0, atol=1e-6)
  np.testing.assert_allclose(symmetric[0], -1.0, rtol=0, atol=1e-6)
  np.testing.assert_allclose(symmetric[1], 1.0, rtol=0, atol=1e-6)
  assert -1e-6 <= unit.min() and unit.max() <= 1 + 1e-6


def test_preprocess_scales_exactly():
  images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
  unit = np.asarray(transforms.preprocess(images, size=16, scale="unit"))
  symmetric = np.asarray(transforms.preprocess(images, size=16, scale="symmetric"))
  expected = images[..., None].astype(np.float32)
  np.testing.assert_allclose(unit, np.repeat(expected / 255, 3, -1), rtol=0, atol=1e-7)
  np.testing.assert_allclose(symmetric, np.repeat(expected / 127.5 - 1, 3, -1), rtol=0,
                             atol=2e-7)


@pytest.mark.parametrize("size_in, size_out", [(28, 32), (28, 96), (32, 20)])
def test_preprocess_resize_matches_tf_bilinear(size_in, size_out):
  images = np.random.default_rng(size_in + size_out).integers(
      0, 256, (2, size_in, size_in, 3), dtype=np.uint8)
  got = transforms.preprocess(images, size=size_out, scale="unit")
  expected = tf_bilinear_resize(images, size_out, size_out) / 255
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


def test_preprocess_grey_repeats_to_rgb():
  images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
  out = np.asarray(transforms.preprocess(images, size=32, scale="unit"))
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  np.testing.assert_allclose(out[..., 0], tf_bilinear_resize(images[..., None], 32, 32)[..., 0]
                             / 255, rtol=0, atol=1e-5)


def test_preprocess_rejects_unknown_scale_and_channels():
  with pytest.raises(ValueError, match=r"Unknown scale 'imagenet'.*\['symmetric', 'unit'\]"):
    transforms.preprocess(np.zeros((1, 4, 4), np.uint8), size=4, scale="imagenet")
  with pytest.raises(ValueError, match="1 or 3 channels"):
    transforms.preprocess(np.zeros((1, 4, 4, 2), np.uint8), size=4, scale="unit")


def test_augment_zero_shift_is_identity():
  images = jnp.ones((2, 8, 8, 3))
  assert transforms.augment(jax.random.PRNGKey(0), images, max_shift=0) is images


def _shift(image, dy, dx):
  """``image`` moved down ``dy`` and right ``dx`` pixels, zero-filled."""
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def test_augment_translates_each_image_with_zero_fill():
  rng = np.random.default_rng(0)
  images = rng.uniform(1, 2, (16, 8, 8, 3)).astype(np.float32)  # No zeros before shifting.
  key = jax.random.PRNGKey(3)
  augment = jax.jit(lambda k, x: transforms.augment(k, x, max_shift=2))
  out = np.asarray(augment(key, images))
  assert out.shape == images.shape
  np.testing.assert_array_equal(out, augment(key, images))
  shifts = []
  for image, moved in zip(images, out):
    matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(_shift(image, dy, dx), moved)]
    assert len(matches) == 1
    shifts.append(matches[0])
  assert len(set(shifts)) > 3  # Each image draws its own shift.
  other = augment(jax.random.PRNGKey(4), images)
  assert not np.array_equal(out, other)


# ---------------------------------------------------------------------------------------------
# Order.
# ---------------------------------------------------------------------------------------------


def test_epoch_order_is_a_reproducible_permutation_cut_into_batches():
  order = sources.epoch_order(0, 1, 2, 1000, 33, 30)
  assert order.dtype == np.int32 and order.shape == (33, 30)
  assert len(np.unique(order)) == 990 and order.min() >= 0 and order.max() < 1000
  np.testing.assert_array_equal(order, sources.epoch_order(0, 1, 2, 1000, 33, 30))
  for other in [(1, 1, 2), (0, 0, 2), (0, 1, 3)]:
    assert not np.array_equal(order, sources.epoch_order(*other, 1000, 33, 30))


def test_epoch_order_is_jax_random_permutation_of_the_phase_and_epoch_key():
  """The order of earlier builds (a device permutation), so runs and resumes keep theirs."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), 1), 4)
  expected = np.asarray(jax.random.permutation(key, 100))[:96].reshape(8, 12)
  np.testing.assert_array_equal(sources.epoch_order(7, 1, 4, 100, 8, 12), expected)


# ---------------------------------------------------------------------------------------------
# Photo augmentation and the evaluation view.
# ---------------------------------------------------------------------------------------------


def _photos(n=4, h=8, w=8):
  return (np.random.default_rng(0).integers(0, 256, (n, h, w, 3))).astype(np.uint8)


def test_evaluation_input_without_crop_is_preprocess():
  images = _photos()
  np.testing.assert_array_equal(transforms.evaluation_input(images, size=6, scale="symmetric"),
                                transforms.preprocess(images, size=6, scale="symmetric"))


def test_evaluation_input_takes_the_centre_crop():
  images = _photos(h=10, w=10)
  got = transforms.evaluation_input(images, size=6, scale="unit", crop_fraction=0.6)
  np.testing.assert_array_equal(got, transforms.preprocess(images[:, 2:8, 2:8], size=6, scale="unit"))
  with pytest.raises(ValueError, match=r"crop_fraction=0 must be in \(0, 1\]"):
    transforms.evaluation_input(images, size=6, scale="unit", crop_fraction=0)


def test_random_resized_crop_of_the_whole_image_is_a_bilinear_resize():
  images = _photos(h=12, w=12)
  whole = dict(scale_range=(1.0, 1.0), ratio_range=(1.0, 1.0))
  same = transforms.random_resized_crop(jax.random.PRNGKey(0), images, size=12, **whole)
  np.testing.assert_allclose(same, images.astype(np.float32), atol=1e-4)
  smaller = transforms.random_resized_crop(jax.random.PRNGKey(0), images, size=8, **whole)
  np.testing.assert_allclose(smaller, tf_bilinear_resize(images, 8, 8), atol=1e-3)


def test_random_resized_crop_varies_per_image_and_key_within_range():
  images = np.repeat(_photos(n=1, h=16, w=16), 8, axis=0)
  crop = jax.jit(lambda k, x: transforms.random_resized_crop(
      k, x, size=8, scale_range=(0.2, 0.6), ratio_range=(0.75, 1.333)))
  out = np.asarray(crop(jax.random.PRNGKey(1), images))
  assert out.shape == (8, 8, 8, 3) and 0 <= out.min() and out.max() <= 255
  assert len({out[i].tobytes() for i in range(8)}) == 8
  np.testing.assert_array_equal(out, crop(jax.random.PRNGKey(1), images))
  assert not np.array_equal(out, crop(jax.random.PRNGKey(2), images))


def test_random_flip_mirrors_some_images_and_keeps_the_others():
  x = jnp.asarray(_photos(n=16), jnp.float32)
  out = np.asarray(transforms.random_flip(jax.random.PRNGKey(0), x))
  mirrored = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, np.asarray(x))]
  kept = [np.array_equal(o, xi) for o, xi in zip(out, np.asarray(x))]
  assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_training_input_with_only_a_shift_is_the_shift_of_preprocess():
  images, key = _photos(), jax.random.PRNGKey(3)
  got = transforms.training_input(key, images, view=transforms.EvalView(8, "unit"),
                                 augmentation=transforms.Augmentation(shift=2))
  want = transforms.augment(key, transforms.preprocess(images, size=8, scale="unit"), max_shift=2)
  np.testing.assert_array_equal(got, want)


def test_augmentation_from_config():
  from configs import default
  config = default.get_config()
  assert not transforms.Augmentation.from_config(config.data).active
  config.data.random_crop, config.data.flip = True, True
  augmentation = transforms.Augmentation.from_config(config.data)
  assert augmentation.active and augmentation.crop_scale == (0.35, 1.0) and augmentation.flip
