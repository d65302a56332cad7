"""One run per work directory: each process of a run holds a lock file there while it runs.

``<workdir>/process-<i>.lock`` (``i`` the process index) names the process holding it (PID,
host, start time) and is locked with ``fcntl.flock``. A second run on the same work directory
finds it locked and is refused at once, naming that process. The kernel releases the lock
when its process ends, however it ends, so the file a killed run leaves behind is not held:
the next run takes it over, saying whose it was. A run that ends removes its lock file.

Every process locks a file of its own, not process 0 alone, so that a second multi-process
run is refused on every host, and so that each process can check that it sees the others'
files: hosts must share the work directory (checkpoints are written by all of them together),
and a host that does not is told so instead of waiting for files that never appear.
"""

import contextlib
import datetime
import fcntl
import json
import logging
import os
import pathlib
import secrets
import socket
import time

from tljax import distributed, files


class WorkdirLockedError(files.WorkdirError):
  """Another run holds the work directory."""


def lock_path(workdir: pathlib.Path, process_index: int) -> pathlib.Path:
  return workdir / f"process-{process_index}.lock"


@contextlib.contextmanager
def held(workdir: pathlib.Path, *, timeout_s: float):
  """Holds this process's lock file in ``workdir`` inside the block; every process of the run
  enters together. Raises WorkdirLockedError on every process if any of them finds its file
  held by another run, and WorkdirError if a process does not see the other processes' files
  within ``timeout_s`` (at most a minute)."""
  path = lock_path(workdir, distributed.process_index())
  token = secrets.randbits(31)  # The collectives carry 32-bit integers.
  try:
    fd, refusal = _acquire(path, token), None
  except WorkdirLockedError as e:
    fd, refusal = None, e
  try:
    _refuse_on_every_process(workdir, refusal)
    _check_shared(workdir, distributed.all_processes(token), min(timeout_s, 60))
    yield
  finally:
    if fd is not None:
      _release(path, fd)


def _acquire(path: pathlib.Path, token: int) -> int:
  """Locks ``path`` and writes this process's record into it; returns its descriptor."""
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise files.WorkdirError(f"--workdir {path.parent} cannot be used: its lock file {path} "
                               f"cannot be created ({e.strerror or e}). Pass a directory on "
                               "writable storage.") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirLockedError(_in_use_message(path)) from None
    except OSError as e:  # No locks on this file system (some network or FUSE mounts).
      logging.warning("cannot lock %s (%s): nothing stops a second run from using %s at the "
                      "same time", path, e.strerror or e, path.parent)
      break
    if _same_file(fd, path):
      break
    os.close(fd)  # Its holder removed it as it ended, after this process opened it: again.
  left = _read_record(path)
  if left:
    logging.warning("taking over %s, left by PID %s on host %s (started %s), which is no "
                    "longer running", path, left.get("pid"), left.get("host"),
                    left.get("started"))
  record = {"pid": os.getpid(), "host": socket.gethostname(), "token": token,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
  os.fsync(fd)
  return fd


def _same_file(fd: int, path: pathlib.Path) -> bool:
  try:
    return os.path.samestat(os.fstat(fd), os.stat(path))
  except FileNotFoundError:
    return False


def _read_record(path: pathlib.Path) -> dict:
  """The record in a lock file; {} where it is empty (being written) or unreadable."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


def _in_use_message(path: pathlib.Path) -> str:
  holder = _read_record(path)
  who = (f"PID {holder.get('pid')} on host {holder.get('host')}, started "
         f"{holder.get('started')}" if holder else "a run that is starting")
  return (f"--workdir {path.parent} is in use by another run ({who}; lock file {path}). "
          "Wait for it to end, stop it, or pass another --workdir.")


def _release(path: pathlib.Path, fd: int) -> None:
  """Removes the lock file, then unlocks it (a run that opened it meanwhile tries again)."""
  try:
    with contextlib.suppress(FileNotFoundError):
      path.unlink()
  finally:
    os.close(fd)


def _refuse_on_every_process(workdir: pathlib.Path, refusal: Exception | None) -> None:
  refused = distributed.all_processes(refusal is not None)
  if refusal is not None:
    raise refusal
  if refused.any():
    raise WorkdirLockedError(
        f"--workdir {workdir} is in use by another run: process(es) "
        f"{', '.join(map(str, refused.nonzero()[0]))} found their lock file held (their log "
        "names the holder). Wait for it to end, stop it, or pass another --workdir.")


def _check_shared(workdir: pathlib.Path, tokens, timeout_s: float) -> None:
  """Raises WorkdirError on every process unless each one sees every process's lock file in
  ``workdir`` (holding that process's ``tokens`` entry) within ``timeout_s``."""
  if len(tokens) == 1:
    return
  deadline, unseen = time.monotonic() + timeout_s, list(range(len(tokens)))
  while True:
    unseen = [i for i in unseen
              if _read_record(lock_path(workdir, i)).get("token") != int(tokens[i])]
    if not unseen or time.monotonic() > deadline:
      break
    time.sleep(0.2)
  seen_by = distributed.all_processes([i not in unseen for i in range(len(tokens))])
  missing = [f"process {p} does not see process {i}'s"
             for p, row in enumerate(seen_by) for i, seen in enumerate(row) if not seen]
  if missing:
    raise files.WorkdirError(
        f"--workdir {workdir} is not one directory shared by every process: "
        f"{'; '.join(missing)} lock file there after {timeout_s:.0f} s. Every host must use "
        "the same work directory, on storage all of them mount at the same path (checkpoints "
        "are written by all processes together); check --workdir and the mounts on each "
        "host.")
