"""Shared fixtures: the real data and weights in ../shared, the Keras reference backend, tiny
datasets and finished runs on them, and the order in which ``pytest -n 2 --dist loadfile``
hands out the files. Plain helpers live in helpers.py."""

import contextlib
import fcntl
import http.server
import json
import os
import pathlib
import shutil
import threading

import pytest

# The tests' programs are small and run briefly: compiled without LLVM's optimisation passes
# they compile about a third faster and run no slower (docs/development.md). Set before JAX
# starts its backend; subprocesses inherit it.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0").strip()

from helpers import (FAULT_OVERRIDES, make_folder, tiny_config, tiny_folder_config,
                     unavailable, write_idx)

# Keras is the numerical reference; it must run on the JAX backend, set before its import.
os.environ.setdefault("KERAS_BACKEND", "jax")

SHARED_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def _shared_path(relative: str) -> pathlib.Path:
  path = SHARED_DIR / relative
  if not path.exists():
    unavailable(f"{path} is absent: real data and weights live in ../shared beside the "
                "checkout, which a fresh clone does not have.",
                f"{path} is missing; CI must provide ../shared beside the checkout.")
  return path


# The longest files, longest first (chains of runs in subprocesses; the first users of the
# session's tiny runs): under ``pytest -n 2 --dist loadfile`` the two workers start on the two
# longest and the short files fill in around them, instead of a long one starting last and
# running alone. Measured with ``--durations``; keep the order when a file grows.
LONGEST_FILES = ("test_distributed.py", "test_reliability.py", "test_reliability_resume.py",
                 "test_predict.py", "test_distributed_folder.py", "test_steps.py",
                 "test_quick_start.py", "test_deploy.py", "test_dispatch.py",
                 "test_mobilenet_v2.py", "test_selection.py", "test_sources.py",
                 "test_weights.py", "test_sharding.py", "test_train.py", "test_cli.py",
                 "test_resume.py")


def pytest_configure(config):
  # pytest-xdist hands out files with the most tests first unless told not to
  # (--no-loadscope-reorder); the order below is by duration instead.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: order kept.


def _session_root(tmp_path_factory) -> pathlib.Path:
  """A directory of this test session that every pytest-xdist worker sees: their base
  temporary directories are siblings."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def made_once(tmp_path_factory, name: str, make) -> pathlib.Path:
  """``<session root>/<name>``, filled by ``make(directory)`` once per test session: by the
  first worker that asks, while the other waits for it. A directory whose ``make`` failed is
  made again from scratch."""
  root = _session_root(tmp_path_factory)
  directory, done = root / name, root / f"{name}.done"
  with _locked(root / f"{name}.lock"):
    if not done.exists():
      shutil.rmtree(directory, ignore_errors=True)
      directory.mkdir()
      make(directory)
      done.touch()
  return directory


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the session: a program compiled by one test (or one of
  their subprocesses, which inherit the environment) is loaded, not compiled, by the next.
  Under pytest-xdist both workers share it."""
  import jax
  directory = str(_session_root(tmp_path_factory) / "xla_cache")
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


def _run_once(tmp_path_factory, name: str, config_of):
  """``(directory, workdir, summary)``: ``train.run(config_of(directory), directory / "run")``
  made once per session (``made_once``), and the summary it returned (as JSON, which is how
  summary.json holds it)."""
  from tljax import files, train

  def make(directory):
    summary = train.run(config_of(directory), directory / "run")
    (directory / "returned_summary.json").write_text(files.to_json(summary))

  directory = made_once(tmp_path_factory, name, make)
  return (directory, directory / "run",
          json.loads((directory / "returned_summary.json").read_text()))


@pytest.fixture(scope="session")
def tiny_idx_run(tiny_idx_dir, tmp_path_factory):
  """A finished run of ``helpers.tiny_config`` on tiny_idx_dir: ``(workdir, summary)``; one
  run for the session, read by both pytest-xdist workers (tests must not change it)."""
  _, workdir, summary = _run_once(tmp_path_factory, "tiny_idx_run",
                                  lambda directory: tiny_config(tiny_idx_dir))
  return workdir, summary


@pytest.fixture(scope="session")
def fault_reference(tiny_idx_dir, tmp_path_factory) -> pathlib.Path:
  """The workdir of an uninterrupted run of the fault tests' config (helpers.FAULT_OVERRIDES,
  two checkpoints kept: 20 and 24), where every chain of faults must end bit for bit; one run
  for the session, read by both pytest-xdist workers (tests must not change it)."""
  _, workdir, _ = _run_once(tmp_path_factory, "fault_reference", lambda directory: tiny_config(
      tiny_idx_dir, **{**FAULT_OVERRIDES, "max_to_keep": 2}))
  return workdir


@pytest.fixture(scope="session")
def tiny_folder_run(tmp_path_factory):
  """A finished run on a folder of 36 small JPEGs in 3 classes, with photo augmentation and a
  centre crop: ``(root, workdir, summary)``; one run for the session, read by both
  pytest-xdist workers (tests must not change it)."""
  def config_of(directory):
    root = make_folder(directory / "photos", {"red": 12, "green": 12, "blue": 12}, ext="jpg")
    return tiny_folder_config(root)

  directory, workdir, summary = _run_once(tmp_path_factory, "tiny_folder_run", config_of)
  return directory / "photos", workdir, summary
