"""The README's quick start on a fresh machine: MNIST and the ImageNet weights downloaded on
first use (from a local mirror of ../shared), then read from the cache; a failed download is
one message naming the local alternative, and exit 2."""

import hashlib
import logging

import pytest

import main
from helpers import logged_error
from tljax import exits, train
from tljax.data import idx, load
from tljax.models import mobilenet_v2


@pytest.fixture
def fresh_machine(server, mnist_dir, imagenet_weights_path, tmp_path, monkeypatch):
  """A fresh HOME and no caches; ``server`` on 127.0.0.1 mirrors the MNIST files and the
  Keras weights from ../shared through $TLJAX_DATA_MIRROR and $TLJAX_WEIGHTS_URL."""
  for name in idx.IDX_FILES:
    server.files[f"/mnist/{name}.gz"] = (mnist_dir / f"{name}.gz").read_bytes()
  weights_name = mobilenet_v2.weights_file_name(1.0, 224, include_top=False)
  server.files[f"/keras/{weights_name}"] = imagenet_weights_path.read_bytes()
  # ../shared's train images are a rebuild of the original file (its README says so); every
  # other checksum is the published one.
  url, shas = idx.IDX_SOURCES["mnist"]
  rebuilt = hashlib.sha256(server.files["/mnist/train-images-idx3-ubyte.gz"]).hexdigest()
  monkeypatch.setitem(idx.IDX_SOURCES, "mnist", (url, (rebuilt, *shas[1:])))
  for variable in ("TLJAX_CACHE", "KERAS_HOME", "TFDS_DATA_DIR"):
    monkeypatch.delenv(variable, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("TLJAX_DATA_MIRROR", server.url)
  monkeypatch.setenv("TLJAX_WEIGHTS_URL", f"{server.url}/keras")
  return server


def _quick_start_config():
  """configs/mnist_mnv2.py as the README's quick start runs it (no data.dir, no
  model.weights), with short epochs."""
  from configs import mnist_mnv2
  config = mnist_mnv2.get_config()
  config.data.train_examples = 80
  config.export.formats = ("jax",)  # ONNX and LiteRT files: tests/test_deploy.py.
  config.audit.enabled = False  # Its features pass over MNIST's test images: tests/test_audit.py.
  # The frozen-base phase only: the fine-tune phase runs in the tiny two-phase runs of the
  # other tests (alpha 0.35, the same layer list and rules).
  config.phases = config.phases[:1]
  config.phases[0].epochs = 1
  return config


def _stopped(*args):
  raise KeyboardInterrupt("stopped as its first phase starts")


def test_quick_start_downloads_once_then_runs_from_the_cache(fresh_machine, tmp_path,
                                                          monkeypatch):
  assert main.run(_quick_start_config(), str(tmp_path / "run1")) == 0
  for output in ("summary.json", "confusion_matrix.png", "trained_variables.msgpack"):
    assert (tmp_path / "run1" / output).is_file()
  cache = tmp_path / "home" / ".cache" / "tljax"
  assert sorted(p.name for p in (cache / "datasets" / "mnist").iterdir()) == sorted(
      f"{name}.gz" for name in idx.IDX_FILES)
  weights_name = mobilenet_v2.weights_file_name(1.0, 224, include_top=False)
  assert (cache / weights_name).is_file()
  assert sorted(fresh_machine.requests) == sorted(
      [f"/keras/{weights_name}", *(f"/mnist/{name}.gz" for name in idx.IDX_FILES)])
  fresh_machine.requests.clear()
  # A second run reads both from the cache, checksums checked, until its first phase starts
  # (where it is stopped here: nothing after that reads data or weights).
  monkeypatch.setattr(train, "train_phase", _stopped)
  assert main.run(_quick_start_config(), str(tmp_path / "run2")) == exits.INTERRUPTED
  assert (tmp_path / "run2" / "checkpoints").is_dir() and fresh_machine.requests == []
  # A cached file that no longer has its sha256 (here cut short) is fetched again, alone.
  labels = cache / "datasets" / "mnist" / "t10k-labels-idx1-ubyte.gz"
  labels.write_bytes(labels.read_bytes()[:100])
  assert load.idx_or_tfds("mnist", None).test.labels.shape == (10_000,)
  assert fresh_machine.requests == ["/mnist/t10k-labels-idx1-ubyte.gz"]
  assert labels.read_bytes() == fresh_machine.files["/mnist/t10k-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("fault", ["404", "dropped"])
@pytest.mark.parametrize("what", ["dataset", "weights"])
def test_quick_start_download_failure_is_one_message_and_exit_2(fault, what, fresh_machine,
                                                                 tmp_path, caplog):
  path = next(p for p in fresh_machine.files if p.startswith(
      "/mnist/" if what == "dataset" else "/keras/"))
  if fault == "404":
    del fresh_machine.files[path]
  else:
    fresh_machine.dropped.add(path)
  with caplog.at_level(logging.ERROR):
    assert main.run(_quick_start_config(), str(tmp_path / "run")) == 2
  record = logged_error(caplog)
  expected = "answered HTTP 404" if fault == "404" else "closed the connection before sending"
  local = "--config.data.dir=" if what == "dataset" else "--config.model.weights="
  assert expected in record.getMessage() and local in record.getMessage()
  assert not record.exc_info
