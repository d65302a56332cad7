"""tljax.data.idx: IDX files read exactly (real MNIST and Fashion-MNIST), malformed files named
with their fault, a folder of the four files, and their download into the cache."""

import gzip
import hashlib
import pathlib

import numpy as np
import pytest

from helpers import write_idx, write_idx_folder
from tljax import download
from tljax.data import dataset, idx, load


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
