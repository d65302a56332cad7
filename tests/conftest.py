"""Shared fixtures: the real data and weights in ../shared, and the Keras reference backend."""

import http.server
import logging
import os
import pathlib
import threading

import pytest

# Keras is the numerical reference; it must run on the JAX backend, set before its import.
os.environ.setdefault("KERAS_BACKEND", "jax")

SHARED_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def _shared_path(relative: str) -> pathlib.Path:
  path = SHARED_DIR / relative
  if not path.exists():
    if os.environ.get("CI"):
      pytest.fail(f"{path} is missing; CI must provide ../shared beside the checkout.")
    pytest.skip(f"{path} is absent: real data and weights live in ../shared beside the "
                "checkout, which a fresh clone does not have.")
  return path


# The longest files (each a chain of multi-process runs) first: under ``pytest -n 2 --dist
# loadfile`` they then start at once and the short files fill in around them, instead of one
# starting last and running alone.
LONGEST_FILES = ("test_distributed.py", "test_distributed_folder.py", "test_reliability.py",
                 "test_sharding.py")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.name not in LONGEST_FILES)  # Stable: order kept.


def logged_error(caplog) -> logging.LogRecord:
  """The one error tljax logged (``main`` and ``predict`` log to the root logger).

  Libraries log under their own names (Orbax as ``absl``, JAX as ``jax._src...``) and may do
  so from background threads at any time; those are not the run's message.
  """
  errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
  ours = [r for r in errors if r.name == "root"]
  assert len(ours) == 1, [f"{r.name}: {r.getMessage()}" for r in errors]
  return ours[0]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the session: a program compiled by one test (or one of
  their subprocesses, which inherit the environment) is loaded, not compiled, by the next.
  Under pytest-xdist both workers share it (their base temporary directories are siblings)."""
  import jax
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  directory = str(root / "xla_cache")
  os.makedirs(directory, exist_ok=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=directory,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  return directory


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """``../shared`` beside the checkout (real MNIST, Fashion-MNIST, ImageNet weights)."""
  return _shared_path("")


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
  return _shared_path("data/mnist")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> pathlib.Path:
  return _shared_path("data/fashion-mnist")


@pytest.fixture(scope="session")
def imagenet_weights_path() -> pathlib.Path:
  return _shared_path("weights/mobilenet_v2_1.0_imagenet_no_top.h5")


def write_idx(path: pathlib.Path, array) -> None:
  """Writes ``array`` (uint8, 1-D labels or 3-D images) as a gzipped IDX file."""
  import gzip
  import numpy as np
  magic = {1: 0x801, 3: 0x803}[array.ndim]
  header = np.array([magic, *array.shape], ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_idx_dir(tmp_path_factory) -> pathlib.Path:
  """A learnable 10-class IDX dataset: 160 train and 40 test 28x28 images (a bright bar
  whose position is the class), in the MNIST file layout."""
  import numpy as np
  rng = np.random.default_rng(0)
  folder = tmp_path_factory.mktemp("tiny_idx")
  for prefix, n in (("train", 160), ("t10k", 40)):
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
      images[i, 2 + 2 * label:4 + 2 * label, 4:24] = 255
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
  return folder


class _Handler(http.server.BaseHTTPRequestHandler):
  files: dict[str, bytes] = {}
  cut_short: set[str] = set()   # Paths whose body stops half way.
  dropped: set[str] = set()     # Paths whose connection closes before any answer.
  requests: list[str] = []
  url = ""

  def do_GET(self):  # noqa: N802 (http.server's name)
    self.requests.append(self.path)
    if self.path in self.dropped:
      self.close_connection = True
      return
    data = self.files.get(self.path)
    if data is None:
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data[:len(data) // 2] if self.path in self.cut_short else data)

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  """An HTTP server on 127.0.0.1; set ``files``, ``cut_short``, ``dropped``; read ``requests``."""
  _Handler.files, _Handler.cut_short, _Handler.dropped, _Handler.requests = {}, set(), set(), []
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  _Handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"
  yield _Handler
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(scope="session")
def tiny_idx_run(tiny_idx_dir, tmp_path_factory):
  """A finished run of ``test_train.tiny_config`` on tiny_idx_dir: ``(workdir, summary)``."""
  from test_train import tiny_config
  from tljax import train
  workdir = tmp_path_factory.mktemp("tiny_idx_run")
  return workdir, train.run(tiny_config(tiny_idx_dir), workdir)


@pytest.fixture(scope="session")
def tiny_folder_run(tmp_path_factory):
  """A finished run on a folder of 36 small JPEGs in 3 classes, with photo augmentation and a
  centre crop: ``(root, workdir, summary)``."""
  from test_folder import make_folder, tiny_folder_config
  from tljax import train
  root = make_folder(tmp_path_factory.mktemp("tiny_folder") / "photos",
                     {"red": 12, "green": 12, "blue": 12}, ext="jpg")
  workdir = root.parent / "run"
  return root, workdir, train.run(tiny_folder_config(root), workdir)
