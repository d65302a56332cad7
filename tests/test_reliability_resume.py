"""Faults around restarts: a second Ctrl-C, non-finite losses, resuming on other data,
damaged checkpoints, a full disk while writing the outputs, a non-finite test loss.

Runs through main.py in subprocesses under tests/fault_driver.py where the process itself is
what is tested (signals, the log a user sees), else in process, most from a copy of one
uninterrupted run's workdir (``finished``). The other half of the fault tests, one workdir
through a chain of faults (Ctrl-C and its rerun among them): tests/test_reliability.py (two
files, so that pytest -n 2 runs them side by side).
"""

import errno
import gzip
import json
import logging
import os
import pathlib
import re
import shutil

import jax.numpy as jnp
import pytest

from helpers import FAULT_OVERRIDES as OVERRIDES
from helpers import (assert_same_state, fault_launcher, logged_error, read_records,
                     resumed_from, saved_checkpoint, tiny_config)
from tljax import dispatch, files, steps


@pytest.fixture(scope="module")
def launch(tiny_idx_dir, tmp_path_factory):
  return fault_launcher(tmp_path_factory.mktemp("launch"), tiny_idx_dir)


@pytest.fixture(scope="module")
def finished(fault_reference):
  """conftest's uninterrupted run, keeping two checkpoints (20 and 24), and its final state."""
  return fault_reference, saved_checkpoint(fault_reference)[2]

# ---------------------------------------------------------------------------------------------
# Non-finite losses.
# ---------------------------------------------------------------------------------------------


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_idx_dir, tmp_path, caplog,
                                                         monkeypatch):
  cross_entropy = steps.cross_entropy
  monkeypatch.setattr(steps, "cross_entropy", lambda *args: cross_entropy(*args) * jnp.nan)
  workdir = tmp_path / "nan"
  assert _rerun(workdir, tiny_idx_dir, caplog, max_to_keep=1, max_bad_steps=3) == 1
  assert logged_error(caplog).getMessage().startswith(
      "phase frozen_base: steps 1..4 of the phase all had a non-finite loss or gradient "
      "(max_bad_steps=3); they were skipped.")
  records = [r for r in read_records(workdir) if r["kind"] == "step"]
  assert [(r["step"], r["skipped_steps"]) for r in records] == [(2, 2), (4, 2)]
  assert all(r["loss"] is None for r in records)  # Strict JSON: null, not NaN.
  assert "NaN" not in (workdir / "metrics.jsonl").read_text()
  assert saved_checkpoint(workdir)[0] is None and not (workdir / "summary.json").exists()


# ---------------------------------------------------------------------------------------------
# Resuming from the wrong data or a damaged checkpoint.
# ---------------------------------------------------------------------------------------------


def _rerun(workdir, data_dir, caplog, **overrides) -> int:
  import main
  caplog.clear()
  with caplog.at_level(logging.INFO):
    return main.run(tiny_config(data_dir, **{**OVERRIDES, "max_to_keep": 2, **overrides}),
                    str(workdir))


def _copy_without_outputs(finished, tmp_path) -> pathlib.Path:
  workdir = shutil.copytree(finished[0], tmp_path / "run")
  (workdir / "summary.json").unlink()
  return workdir


def _largest_state_file(workdir, step) -> pathlib.Path:
  files = (p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file())
  return max(files, key=lambda p: p.stat().st_size)


def _bit_rot(path):
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4096] = bytes(4096)
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_resuming_on_other_data_is_refused(finished, tiny_idx_dir, tmp_path, caplog):
  other = shutil.copytree(tiny_idx_dir, tmp_path / "other")
  images = other / "train-images-idx3-ubyte.gz"
  data = bytearray(gzip.decompress(images.read_bytes()))
  data[-1] ^= 1  # One pixel of one image.
  images.write_bytes(gzip.compress(bytes(data)))
  before = {p: p.stat().st_mtime_ns for p in finished[0].rglob("*")}
  assert _rerun(finished[0], other, caplog) == 2
  assert "holds checkpoints of another config (differs in ['data.identity'])" in caplog.text
  assert {p: p.stat().st_mtime_ns for p in finished[0].rglob("*")} == before


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(
    finished, launch, tmp_path):
  """On the command line: one line says so, and Orbax's abandoned reads (hundreds of
  tracebacks when collected) stay out of the log."""
  workdir = _copy_without_outputs(finished, tmp_path)
  _bit_rot(_largest_state_file(workdir, 24))
  outcome = launch(workdir, max_to_keep=2)
  assert outcome.returncode == 0 and outcome.outputs, outcome.stderr[-3000:]
  lines = outcome.stderr.splitlines()
  [at] = [i for i, line in enumerate(lines) if "moved it to" in line]
  assert f"] checkpoint {workdir}/checkpoints/24 " in lines[at]
  assert f"moved it to {workdir}/checkpoints.rejected/24" in lines[at]
  assert re.match(r"[IWEF]\d{4} ", lines[at + 1])  # The message is one line.
  assert resumed_from(outcome) == 20
  for noise in ("Traceback", "Exception ignored", "Event loop is closed"):
    assert noise not in outcome.stderr, outcome.stderr[-3000:]
  _assert_resumed_from_20(finished, workdir)


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(
    finished, tiny_idx_dir, tmp_path, caplog):
  workdir = _copy_without_outputs(finished, tmp_path)
  _truncate(_largest_state_file(workdir, 24))
  assert _rerun(workdir, tiny_idx_dir, caplog) == 0
  assert f"moved it to {workdir}/checkpoints.rejected/24" in caplog.text
  assert "resuming from checkpoint 20:" in caplog.text
  _assert_resumed_from_20(finished, workdir)


def _assert_resumed_from_20(finished, workdir):
  """Checkpoint 24 set aside, 20 resumed, and the run ended as the uninterrupted one."""
  assert (workdir / "checkpoints.rejected" / "24" / "state").is_dir()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "24"]
  assert_same_state(finished[1], saved_checkpoint(workdir)[2])
  assert (json.loads((workdir / "summary.json").read_text())["test_loss"]
          == json.loads((finished[0] / "summary.json").read_text())["test_loss"])


def test_no_restorable_checkpoint_fails_naming_the_directories_tried(
    finished, tiny_idx_dir, tmp_path, caplog):
  workdir = _copy_without_outputs(finished, tmp_path)
  for step in (20, 24):
    _truncate(_largest_state_file(workdir, step))
  assert _rerun(workdir, tiny_idx_dir, caplog) == 1
  error = logged_error(caplog).getMessage()
  assert error == (
      f"no checkpoint in {workdir}/checkpoints could be restored; tried "
      f"{workdir}/checkpoints/24 (now {workdir}/checkpoints.rejected/24), "
      f"{workdir}/checkpoints/20 (now {workdir}/checkpoints.rejected/20). Rerunning the same "
      "command starts the run from the beginning.")
  assert sorted(os.listdir(workdir / "checkpoints.rejected")) == ["20", "24"]


def test_a_full_disk_while_writing_the_outputs_fails_and_keeps_the_checkpoints(
    finished, tiny_idx_dir, tmp_path, caplog, monkeypatch):
  workdir = _copy_without_outputs(finished, tmp_path)

  def disk_full(path, mode="w"):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
  monkeypatch.setattr(files, "atomic_open", disk_full)
  assert _rerun(workdir, tiny_idx_dir, caplog) == 1
  error = logged_error(caplog).getMessage()
  assert error.startswith(f"writing the outputs to {workdir}/trained_variables.msgpack failed: "
                          "No space left on device. The last checkpoint is kept")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "24"]
  assert not (workdir / "summary.json").exists()


def test_a_non_finite_test_loss_fails_the_run(finished, tiny_idx_dir, tmp_path, caplog,
                                               monkeypatch):
  workdir = _copy_without_outputs(finished, tmp_path)
  evaluate_split = dispatch.evaluate_split
  monkeypatch.setattr(dispatch, "evaluate_split", lambda *args: (
      float("nan"), *evaluate_split(*args)[1:]))
  assert _rerun(workdir, tiny_idx_dir, caplog) == 1
  assert "the test loss is nan: the trained model computes non-finite values" in caplog.text
  assert not (workdir / "summary.json").exists()


def test_a_second_ctrl_c_stops_at_once_with_130(launch, tmp_path):
  # Without leaving before Python's shutdown, the JAX thread made this abort (134) in 1 of 2
  # tries.
  outcome = launch(tmp_path / "ctrl_c_twice", "jax_thread,sigint_again_from_step=2")
  assert outcome.returncode == 130, outcome.stderr[-3000:]
  assert "press Ctrl-C again to stop at once" in outcome.stderr
  assert "interrupted: stopped at once" in outcome.stderr
  assert "terminate called" not in outcome.stderr and "Fatal Python error" not in outcome.stderr
  assert not list((tmp_path / "ctrl_c_twice").glob("*.lock"))
