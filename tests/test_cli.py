"""main.py: each bad command line or input is one message and exit 2, before any long work;
the other exit codes (143 preempted, 1 failed) come from what train.run raised."""

import errno
import gzip
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import main
from helpers import REPO, logged_error, tiny_config
from tljax import checkpoint, exits, preemption, steps, train
from tljax.data import idx


def _cli(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "main.py", "--config=configs/default.py", *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("flag, message", [
    ("--config.batchsize=16", "--config.batchsize: config has no key 'batchsize'. Did you mean "
     "--config.batch_size? Its keys are: audit, batch_size, cache_max_gb, calibrate, "
     "checkpoint_every_steps, class_weighting, data, distributed, eval_batch_size, export, "
     "max_bad_steps, max_to_keep, model, phases, seed, steps_per_dispatch, tensorboard."),
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
  _unreadable(idx, labels, monkeypatch)
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
