"""IDX files, the format MNIST and Fashion-MNIST are published in: read a folder of the four
files (each ``.gz`` or plain; works offline), or download them once into the cache, each
checked against the sha256 tensorflow-datasets publishes."""

import gzip
import math
import os
import pathlib
import struct
import zlib

import numpy as np

from tljax import download
from tljax.data.dataset import Dataset, DataError, Split, content_digest, unreadable

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_FIX = ("Re-download it; an IDX dataset folder holds the four files "
            + ", ".join(f"{stem}.gz" for stem in IDX_FILES) + " (or the same names unzipped).")
_IDX_MAGIC = {0x00000801: (1, "uint8 labels, 1-D"), 0x00000803: (3, "uint8 images, 3-D")}

IDX_CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}
# The IDX datasets tljax downloads itself (tfds needs TensorFlow to prepare them): the
# addresses and sha256 tensorflow-datasets uses, in IDX_FILES order.
IDX_SOURCES = {
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/", (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", (
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")),
}
# A mirror of the IDX files: <mirror>/<dataset name>/<file>.
DATA_MIRROR_ENV = "TLJAX_DATA_MIRROR"


def read_idx(path: str | pathlib.Path) -> np.ndarray:
  """Reads a uint8 IDX file (``.gz`` or plain): labels [N] or images [N, H, W]."""
  path = pathlib.Path(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise DataError(f"{path}: no such file. {_IDX_FIX}") from None
  except OSError as e:
    raise unreadable(path, e) from None
  try:
    if path.suffix == ".gz":
      data = gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: cannot be decompressed ({e}); the file is damaged or "
                    f"truncated. {_IDX_FIX}") from None
  magic = int.from_bytes(data[:4], "big")
  if len(data) < 4 or magic not in _IDX_MAGIC:
    expected = " or ".join(f"0x{m:08x} ({what})" for m, (_, what) in _IDX_MAGIC.items())
    hint = " It is gzip data: name it *.gz." if data[:2] == b"\x1f\x8b" else ""
    raise DataError(f"{path}: not a uint8 IDX file: expected magic number {expected}, found "
                    f"0x{data[:4].hex():0>8}.{hint} {_IDX_FIX}")
  ndim = _IDX_MAGIC[magic][0]
  offset = 4 + 4 * ndim
  if len(data) < offset:
    raise DataError(f"{path}: truncated IDX header: expected {offset} bytes, found "
                    f"{len(data)}. {_IDX_FIX}")
  dims = struct.unpack(f">{ndim}I", data[4:offset])
  expected_size, found_size = math.prod(dims), len(data) - offset
  if found_size != expected_size:
    raise DataError(f"{path}: header dims {dims} call for {expected_size} bytes of data, found "
                    f"{found_size} (truncated or corrupt). {_IDX_FIX}")
  return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)



def find_idx_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
  return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def _idx_split(images_path: pathlib.Path, labels_path: pathlib.Path) -> Split:
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or labels.ndim != 1:
    raise DataError(f"{images_path} must hold images [N,H,W] and {labels_path} labels [N], "
                    f"found shapes {images.shape} and {labels.shape}. {_IDX_FIX}")
  if len(images) != len(labels):
    raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                    f"{len(labels)} labels; the files do not belong together. {_IDX_FIX}")
  return Split(images, labels.astype(np.int32))


def load_idx_folder(path: str | pathlib.Path, name: str) -> Dataset:
  """Loads the four IDX files in ``path``; ``name`` picks the class names.

  ``"mnist"`` and ``"fashion_mnist"`` get their published class names, any other name
  ``"0"``, ``"1"``, ... up to the largest label.
  """
  folder = pathlib.Path(path)
  files = {stem: find_idx_file(folder, stem) for stem in IDX_FILES}
  missing = [stem for stem, p in files.items() if p is None]
  if missing:
    raise DataError(f"{folder}: missing IDX files {missing} (each .gz or plain). {_IDX_FIX}")
  train = _idx_split(files[IDX_FILES[0]], files[IDX_FILES[1]])
  test = _idx_split(files[IDX_FILES[2]], files[IDX_FILES[3]])
  max_label = int(max(train.labels.max(initial=0), test.labels.max(initial=0)))
  class_names = IDX_CLASS_NAMES.get(name, tuple(str(i) for i in range(max_label + 1)))
  if max_label >= len(class_names):
    raise DataError(f"{folder}: label {max_label} found, but {name} has {len(class_names)} "
                    "classes; is this the right dataset name for this folder?")
  return Dataset(train, test, len(class_names), class_names, name,
                 identity=f"idx sha256:{content_digest(train, test)}")


def idx_downloads(name: str) -> dict[str, tuple[str, str]]:
  """``{file name: (url, sha256)}`` of the four IDX files of ``name`` ("mnist" or
  "fashion_mnist"): from the addresses tensorflow-datasets uses, or from
  ``$TLJAX_DATA_MIRROR/<name>/`` where that names a mirror; checksums as tfds publishes them."""
  base_url, checksums = IDX_SOURCES[name]
  mirror = os.environ.get(DATA_MIRROR_ENV)
  base_url = f"{mirror.rstrip('/')}/{name}/" if mirror else base_url
  return {f"{stem}.gz": (base_url + f"{stem}.gz", sha256)
          for stem, sha256 in zip(IDX_FILES, checksums)}


def fetch_idx(name: str, cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
  """Downloads the four IDX files of ``name`` into ``<cache_dir>/datasets/<name>`` (once; each
  checked against its sha256) and returns that folder. ``cache_dir`` None: $TLJAX_CACHE or
  ~/.cache/tljax."""
  folder = (pathlib.Path(cache_dir) if cache_dir else download.default_cache_dir())
  folder = folder / "datasets" / name
  instead = (f"pass --config.data.dir=<folder with the four files "
             f"{', '.join(f'{stem}.gz' for stem in IDX_FILES)}>")
  for url, sha256 in idx_downloads(name).values():
    try:
      download.fetch(url, folder, sha256, what=f"{name} download", instead=instead)
    except download.DownloadError as e:
      raise DataError(str(e)) from None
  return folder


