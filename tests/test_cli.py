"""main.py: each bad command line or input is one message and exit 2, before any long work;
the other exit codes (143 preempted, 1 failed) come from what train.run raised."""

import errno
import gzip
import hashlib
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import h5py
import numpy as np
import pytest

import main
from conftest import logged_error
from test_train import tiny_config
from tljax import checkpoint, checks, exits, preemption, steps, train
from tljax.data import idx, load
from tljax.models import mobilenet_v2

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cli(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "main.py", "--config=configs/default.py", *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("flag, message", [
    ("--config.batchsize=16", "--config.batchsize: config has no key 'batchsize'. Did you mean "
     "--config.batch_size? Its keys are: batch_size, cache_max_gb, checkpoint_every_steps, "
     "data, distributed, eval_batch_size, max_bad_steps, max_to_keep, model, phases, seed, "
     "steps_per_dispatch, tensorboard."),
    ("--config.phases[1].epoch=2", "--config.phases[1].epoch: config.phases[1] has no key "
     "'epoch'. Did you mean --config.phases[1].epochs? Its keys are: batchnorm, cache_prefix, "
     "early_stopping_patience, ema_decay, epochs,"),
    ("--config.phases[2].epochs=1", "config.phases has 2 entries, so [2] does not exist."),
    ("--config.batch_size=16.5", "flag --config.batch_size=16.5: invalid literal for int()"),
])
def test_bad_config_override_is_one_message_and_exit_2(flag, message, tmp_path):
  done = _cli(f"--workdir={tmp_path / 'run'}", flag)
  assert done.returncode == exits.BAD_INPUT == 2, done.stderr[-2000:]
  assert message in done.stderr
  assert done.stderr.strip().endswith("Run with --helpfull to list the flags.")
  assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()


def test_truncated_weights_file_is_one_message_and_exit_2(tiny_idx_dir, tmp_path):
  path = tmp_path / "weights.h5"
  with h5py.File(path, "w") as f:
    f["Conv1/kernel"] = np.zeros((64, 1024), np.float32)
  path.write_bytes(path.read_bytes()[:100_000])
  done = _cli(f"--workdir={tmp_path / 'run'}", f"--config.data.dir={tiny_idx_dir}",
              "--config.model.alpha=0.35", f"--config.model.weights={path}")
  assert done.returncode == 2, done.stderr[-2000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("E")]
  assert len(errors) == 1 and f"{path} is a corrupt or truncated HDF5 file" in errors[0]
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# main.run in process: the message and code for each mistake, raised before weights load.
# ---------------------------------------------------------------------------------------------


def _bad_magic(folder: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  copy = shutil.copytree(folder, tmp_path / "idx")
  labels = copy / "train-labels-idx1-ubyte.gz"
  data = gzip.decompress(labels.read_bytes())
  labels.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + data[4:]))
  return copy


@pytest.mark.parametrize("overrides, message", [
    ({"model.alpha": 0.3}, r"model.alpha=0.3 is not one of \(0.35, 0.5, 0.75, 1.0, 1.3, 1.4\)"),
    ({"phases.1.weight_decay": 1e-4},
     r"phase 'fine_tune': weight_decay=0.0001 needs optimizer='adamw'"),
    ({"phases.1.rules": ("freeze:layers[:100]", "freeze:block_99_.*", "train:.*")},
     r"freeze rules \['freeze:block_99_.\*'\] match no parameter"),
    ({"data.name": "no_such_dataset", "data.dir": ""},
     r"Unknown dataset 'no_such_dataset': tensorflow-datasets has no such builder"),
    ({"data.dir": "BAD_MAGIC"},
     r"idx/train-labels-idx1-ubyte.gz: not a uint8 IDX file: expected magic number "
     r"0x0000080[13] .* found 0x00000d01"),
    ({"max_to_keep": 0}, r"max_to_keep=0 must be at least 1"),
    ({"phases.1.rules": ("freeze:.*",)}, r"phases\[1\] \('fine_tune'\): the rules "
     r"\('freeze:.\*',\) freeze every parameter, so the phase would train nothing"),
    ({"phases.0.learning_rate": float("inf")},
     r"learning_rate=inf must be a positive finite number"),
    ({"model.input_size": 10000}, r"model.input_size=10000: a training batch of 16 images "
     r"needs about [\d,]+ GiB of activations per device, more than the [\d,.]+ GiB of memory "
     r"of cpu device 0. Lower model.input_size \(about \d+ fits\) or batch_size."),
    ({"CHECKPOINTS_IS_A_FILE": True}, r"cannot write checkpoints to .*/run/checkpoints: "
     r"\[Errno 17\] File exists"),
], ids=["alpha", "weight_decay_with_adam", "rule_matching_nothing", "unknown_dataset",
        "idx_magic", "max_to_keep", "all_frozen_phase", "infinite_learning_rate",
        "input_size_beyond_memory", "checkpoints_not_a_directory"])
def test_bad_input_is_one_message_and_exit_2_before_weights_load(
    overrides, message, tiny_idx_dir, tmp_path, monkeypatch, caplog):
  overrides = dict(overrides)
  if overrides.get("data.dir") == "BAD_MAGIC":
    overrides["data.dir"] = str(_bad_magic(tiny_idx_dir, tmp_path))
  workdir = tmp_path / "run"
  checkpoints_file = overrides.pop("CHECKPOINTS_IS_A_FILE", False)
  if checkpoints_file:
    workdir.mkdir()
    (workdir / "checkpoints").write_text("")
  monkeypatch.setattr(train.weights, "load_pretrained",
                      lambda *a, **k: pytest.fail("weights loaded before the input was checked"))
  with caplog.at_level(logging.ERROR):
    assert main.run(tiny_config(tiny_idx_dir, **overrides), str(workdir)) == 2
  record = logged_error(caplog)
  assert not record.exc_info and "\n" not in record.getMessage()
  assert re.search(message, record.getMessage()), record.getMessage()
  assert not (workdir / "metrics.jsonl").exists()
  if not checkpoints_file:
    assert not workdir.exists()  # Checked before anything is created.


def _main_run(config, workdir, caplog) -> tuple[int, str]:
  """``main.run``'s exit code and its one error message."""
  with caplog.at_level(logging.ERROR):
    code = main.run(config, str(workdir))
  record = logged_error(caplog)
  assert not record.exc_info and "\n" not in record.getMessage()
  return code, record.getMessage()


def test_workdir_that_is_a_file_is_one_message_and_exit_2(tiny_idx_dir, tmp_path, caplog):
  (tmp_path / "file").write_text("")
  for workdir in (tmp_path / "file", tmp_path / "file" / "run"):
    caplog.clear()
    assert _main_run(tiny_config(tiny_idx_dir), workdir, caplog) == (
        2, f"--workdir {workdir} cannot be used: "
        f"{'it is not a directory' if workdir.name == 'file' else 'Not a directory'}. Pass a "
        "directory on writable storage (it is created if missing).")


def test_workdir_on_read_only_storage_is_one_message_and_exit_2(tiny_idx_dir, tmp_path, caplog,
                                                                 monkeypatch):
  def read_only(self, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", str(self))
  monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
  assert _main_run(tiny_config(tiny_idx_dir), tmp_path / "run", caplog) == (
      2, f"--workdir {tmp_path / 'run'} cannot be used: Read-only file system. Pass a directory "
      "on writable storage (it is created if missing).")


def _unreadable(module, path, monkeypatch):
  """Makes ``open(path)`` inside ``module`` fail as a file without read permission does (the
  tests run as root, whom file modes do not stop)."""
  def guarded_open(file, *args, **kwargs):
    if pathlib.Path(file) == path:
      raise PermissionError(errno.EACCES, "Permission denied", str(file))
    return open(file, *args, **kwargs)
  monkeypatch.setattr(module, "open", guarded_open, raising=False)


def test_unreadable_data_file_is_one_message_and_exit_2(tiny_idx_dir, tmp_path, caplog,
                                                        monkeypatch):
  labels = tiny_idx_dir / "train-labels-idx1-ubyte.gz"
  _unreadable(train.data, labels, monkeypatch)
  assert _main_run(tiny_config(tiny_idx_dir), tmp_path / "run", caplog) == (
      2, f"{labels}: cannot be read (Permission denied); check its permissions and that the "
      "storage holding it is reachable.")
  assert not (tmp_path / "run").exists()


def test_unreadable_weights_file_is_not_called_damaged(tiny_idx_dir, tmp_path, caplog,
                                                       monkeypatch):
  path = tmp_path / "weights.h5"
  path.write_bytes(b"\x89HDF")
  _unreadable(train.weights, path, monkeypatch)
  assert _main_run(tiny_config(tiny_idx_dir, **{"model.weights": str(path)}), tmp_path / "run",
                   caplog) == (2, f"weights file {path} cannot be read (Permission denied); "
                               "check its permissions.")


def test_batch_size_must_divide_over_the_devices(tiny_idx_dir):
  three_devices = types.SimpleNamespace(shape={"data": 3})
  with pytest.raises(ValueError, match=r"batch_size=16 must be a positive multiple of the 3 "
                     r"devices in the data mesh; use e.g. --config.batch_size=15 or 18."):
    checks.check_config(tiny_config(tiny_idx_dir), three_devices)


@pytest.mark.parametrize("error, code", [
    (preemption.Preempted("stopped in phase p at step 3 of 8; checkpoint 3 is saved"), 143),
    (steps.NonFiniteError("phase p: steps 1..10 of the phase all had a non-finite loss"), 1),
    (checkpoint.CheckpointWriteError("writing a checkpoint to /w failed: disk full"), 1),
    (checkpoint.CheckpointError("/w holds checkpoints of another config"), 2),
], ids=["preempted", "non_finite", "write_failed", "incompatible_checkpoints"])
def test_exit_code_of_each_failure(error, code, monkeypatch, caplog):
  def fail(config, workdir):
    raise error
  monkeypatch.setattr(train, "run", fail)
  with caplog.at_level(logging.WARNING):
    assert main.run(None, "/w") == code
  assert str(error) in caplog.text


@pytest.mark.parametrize("bug", [KeyError("missing"), ValueError("operands could not be "
                                                                 "broadcast together")])
def test_a_bug_is_exit_1_with_the_hint_for_its_traceback(bug, monkeypatch, caplog):
  def fail(config, workdir):
    raise bug
  monkeypatch.setattr(train, "run", fail)
  assert _main_run(None, "/w", caplog) == (
      1, f"unexpected {type(bug).__name__} (a bug in tljax): {bug} Rerun with --verbosity=1 "
      "for the traceback, and report it.")


# ---------------------------------------------------------------------------------------------
# The quick start on a fresh machine: MNIST and the ImageNet weights downloaded on first use.


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
  for phase in config.phases:
    phase.epochs = 1
  return config


def test_quick_start_downloads_once_then_runs_from_the_cache(fresh_machine, tmp_path):
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
  assert main.run(_quick_start_config(), str(tmp_path / "run2")) == 0
  assert fresh_machine.requests == []
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
