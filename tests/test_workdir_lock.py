"""tljax.workdir_lock: one run per work directory; a lock left by a dead run is taken over;
released on every exit path."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

import main
from helpers import logged_error, tiny_config
from tljax import resume, train, workdir_lock

# Holds the lock file argv[1] as a run does, until its stdin closes.
HOLDER = """
import fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "elsewhere", "started": "then"}).encode())
print("held", flush=True)
sys.stdin.read()
"""


def test_a_held_workdir_is_refused_naming_its_holder_then_released(tmp_path):
  path = tmp_path / "process-0.lock"
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(workdir_lock.WorkdirLockedError) as e:
      with workdir_lock.held(tmp_path, timeout_s=1):
        pytest.fail("entered a held work directory")
    assert str(e.value) == (
        f"--workdir {tmp_path} is in use by another run (PID {holder.pid} on host elsewhere, "
        f"started then; lock file {path}). Wait for it to end, stop it, or pass another "
        "--workdir.")
    assert path.exists()  # The holder's file is left alone.
  finally:
    holder.communicate("")
  with workdir_lock.held(tmp_path, timeout_s=1):
    record = json.loads(path.read_text())
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
  assert not path.exists()


def test_a_lock_left_by_a_dead_run_is_taken_over_with_one_warning(tmp_path, caplog):
  path = tmp_path / "process-0.lock"
  path.write_text(json.dumps({"pid": 4321, "host": "gone", "started": "yesterday"}))
  with caplog.at_level(logging.WARNING), workdir_lock.held(tmp_path, timeout_s=1):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert [r.getMessage() for r in caplog.records] == [
      f"taking over {path}, left by PID 4321 on host gone (started yesterday), which is no "
      "longer running"]
  assert not path.exists()


def test_a_second_run_on_a_workdir_in_use_is_refused_before_it_writes(
    tiny_idx_dir, tmp_path, monkeypatch, caplog):
  """A run started while another uses the workdir exits 2 naming it; the first run's lock is
  released when it fails."""
  workdir, codes = tmp_path / "run", []
  config = tiny_config(tiny_idx_dir)

  class Crash(Exception):
    pass

  def second_run_then_crash(*args, **kwargs):
    listing = sorted(os.listdir(workdir))
    with caplog.at_level(logging.ERROR):
      codes.append(main.run(config, str(workdir)))
    assert sorted(os.listdir(workdir)) == listing  # The second run wrote nothing.
    raise Crash

  monkeypatch.setattr(resume, "start", second_run_then_crash)
  with pytest.raises(Crash):
    train.run(config, workdir)
  assert codes == [2]
  assert logged_error(caplog).getMessage().startswith(
      f"--workdir {workdir} is in use by another run (PID {os.getpid()} on host "
      f"{socket.gethostname()}, started ")
  assert not (workdir / "process-0.lock").exists()
