"""Orbax checkpoints of the train state: the only module that imports orbax.

A checkpoint holds two items: ``state`` (params, batch_stats, optimizer state, step, RNG: a
pytree restored into an abstract target, so shapes and shardings are checked) and ``meta``
(JSON: the phase it belongs to, the config fingerprint, finished phases' results, and the
sha256 of the state's arrays, checked on restore: a damaged checkpoint raises
CheckpointDamagedError instead of restoring wrong values). Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a process killed mid-write leaves no
checkpoint that a restart could read, and older checkpoints are deleted (beyond
``max_to_keep``) only once a newer one is complete.
"""

import contextlib
import hashlib
import logging
import pathlib
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE, _META = "state", "meta"
_DIGEST = "state_sha256"  # In meta: the sha256 of the state's arrays (state_digest).


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or does not fit the run."""


class CheckpointWriteError(CheckpointError):
  """Writing a checkpoint failed while the run was going (disk full, storage gone)."""


class CheckpointDamagedError(CheckpointError):
  """A checkpoint that cannot be read, or whose arrays do not match the digest saved with it."""


class Checkpointer:
  """Saves and restores ``(state, meta)`` pairs under ``<workdir>/<name>``."""

  def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 2,
               name: str = "checkpoints", timeout_s: int = 1200):
    self.directory = pathlib.Path(workdir).absolute() / name
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep} must be at least 1: a restart resumes from "
                       "the latest checkpoint.")
    _check_writable(self.directory)
    for name in _NOISY_LOGGERS:
      logging.getLogger(name).addFilter(_ORBAX_FAILURE_LOGS)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
        # A step directory that cannot be created then fails save() itself, instead of
        # leaving background writers waiting for it until the async timeout. That timeout
        # bounds the wait for the other processes to finish their part of a checkpoint.
        async_options=ocp.AsyncOptions(timeout_secs=int(timeout_s),
                                       create_directories_asynchronously=False))
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _META: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of the complete checkpoints, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Starts an asynchronous save; the previous save is finished (and checked) first."""
    self.wait()
    meta = {**meta, _DIGEST: state_digest(state)}
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
      raise CheckpointWriteError(
          f"could not write checkpoint {step} to {self.directory}: {e}") from e

  def wait(self) -> None:
    """Blocks until pending writes are on disk; raises if one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise CheckpointWriteError(
          f"writing a checkpoint to {self.directory} failed: {e}; the previous checkpoint "
          "is kept.") from e

  def delete(self, step: int) -> None:
    """Removes checkpoint ``step`` if there is one."""
    if step in self._manager.all_steps():
      self._manager.delete(step)

  def restore_meta(self, step: int) -> dict[str, Any]:
    """The meta of checkpoint ``step``; CheckpointDamagedError if it cannot be read."""
    with self._damage_reported(step):
      return self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))[_META]

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Restores ``state`` of checkpoint ``step`` into the structure of ``abstract_state``.

    A structure or shape mismatch (another model, another number of classes) raises
    CheckpointError naming the first differing path and both shapes; a checkpoint that
    cannot be read or whose arrays differ from the digest saved with them raises
    CheckpointDamagedError.
    """
    expected = self.restore_meta(step).get(_DIGEST)  # Checkpoints of older versions lack it.
    with self._damage_reported(step):
      saved = self._manager.item_metadata(step)[_STATE]
    _check_compatible(saved, abstract_state, self.directory / str(step))
    with self._damage_reported(step):
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))[_STATE]
    if expected is not None and state_digest(state) != expected:
      raise CheckpointDamagedError(f"checkpoint {self.directory / str(step)} is damaged: its "
                                   "arrays differ from the digest saved with them")
    return state

  @contextlib.contextmanager
  def _damage_reported(self, step: int):
    """Raises what reading checkpoint ``step`` raised as one-line CheckpointDamagedError."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds
      cause = " ".join(str(e).split()).split(" See full TensorStore details")[0]
      raise CheckpointDamagedError(f"checkpoint {self.directory / str(step)} cannot be read "
                                   f"({cause[:200]})") from e

  def set_aside(self, step: int) -> pathlib.Path:
    """Moves checkpoint ``step`` into ``<workdir>/checkpoints.rejected/`` (nothing is
    deleted) and returns its new path."""
    rejected = self.directory.with_name(self.directory.name + ".rejected")
    rejected.mkdir(exist_ok=True)
    target, copy = rejected / str(step), 1
    while target.exists():
      target, copy = rejected / f"{step}.{copy}", copy + 1
    (self.directory / str(step)).rename(target)
    self._manager.reload()
    return target

  def close(self) -> None:
    try:
      self.wait()
      self._manager.close()
    finally:
      for name in _NOISY_LOGGERS:
        logging.getLogger(name).removeFilter(_ORBAX_FAILURE_LOGS)


class _OrbaxFailureLogs(logging.Filter):
  """Drops Orbax's own error logs (this module reports each failure once, as a
  CheckpointError): its absl errors, the "Event loop is closed" errors its writer threads log
  after a failed write, and the "Task exception was never retrieved" of its reader tasks, logged
  whenever they are collected after a failed restore. Under --verbosity=1 everything is kept."""

  def filter(self, record: logging.LogRecord) -> bool:
    if logging.getLogger().isEnabledFor(logging.DEBUG):
      return True
    exception = record.exc_info[1] if record.exc_info else None
    message = record.getMessage()
    from_orbax = record.levelno >= logging.ERROR and "/orbax/" in record.pathname
    # A task or gathering future of Orbax's: named in the message, or only in its traceback.
    orbax_task = (record.name == "asyncio"
                  and "/orbax/" in f"{message} {_traceback_files(exception)}")
    return not (from_orbax or orbax_task or "Event loop is closed" in f"{message} {exception}")


def _traceback_files(exception: BaseException | None) -> str:
  """The files of ``exception``'s traceback, and of the exceptions it was raised from."""
  names, seen = [], set()
  while exception is not None and id(exception) not in seen:
    seen.add(id(exception))
    tb = exception.__traceback__
    while tb is not None:
      names.append(tb.tb_frame.f_code.co_filename)
      tb = tb.tb_next
    exception = exception.__cause__ or exception.__context__
  return " ".join(names)


_ORBAX_FAILURE_LOGS = _OrbaxFailureLogs()
_NOISY_LOGGERS = ("absl",)  # Orbax logs through absl while a Checkpointer is open.
# Orbax's event loops log through asyncio, also after a Checkpointer is closed.
logging.getLogger("asyncio").addFilter(_ORBAX_FAILURE_LOGS)


def _orbax_follow_on(unraisable) -> bool:
  """Whether an error Python could not raise (``sys.unraisablehook``'s argument) is one a
  failed Orbax read leaves behind: its reader coroutines, raising again when they are
  collected, and its I/O threads' callbacks into the event loop it has closed (hundreds of
  tracebacks after one damaged checkpoint, which this module reports in one line)."""
  code = getattr(unraisable.object, "cr_code", None)
  return ((code is not None and "/orbax/" in code.co_filename)
          or (isinstance(unraisable.exc_value, RuntimeError)
              and str(unraisable.exc_value) == "Event loop is closed"))


def _quiet_unraisable(unraisable, default=sys.unraisablehook) -> None:
  """Drops Orbax's follow-on errors, unless under --verbosity=1; passes the rest on."""
  if _orbax_follow_on(unraisable) and not logging.getLogger().isEnabledFor(logging.DEBUG):
    return
  default(unraisable)


sys.unraisablehook = _quiet_unraisable


def state_digest(state: Any) -> str:
  """The sha256 of every array of ``state``, with its path, dtype and shape."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state)):
    array = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}\n".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


BEST = "best_checkpoints"


def save_best(workdir: str | pathlib.Path, step: int, variables: Any,
              meta: Mapping[str, Any]) -> None:
  """Saves a phase's best ``variables`` so far as ``<workdir>/best_checkpoints/<step>``,
  completely, before returning. The previous best is kept until the run's next checkpoint
  names this one."""
  best = Checkpointer(workdir, max_to_keep=2, name=BEST)
  try:
    best.delete(step)  # Written before a crash, by the same epoch of the same run.
    best.save(step, variables, meta)
  finally:
    best.close()


def restore_best(workdir: str | pathlib.Path, step: int, abstract_variables: Any) -> Any:
  """The variables :func:`save_best` saved at ``step``, into ``abstract_variables``. A damaged
  one is moved into ``<workdir>/best_checkpoints.rejected/`` and raises
  CheckpointDamagedError saying where."""
  best = Checkpointer(workdir, name=BEST)
  try:
    if step not in best._manager.all_steps():
      raise CheckpointError(f"{best.directory} lacks checkpoint {step}, the best epoch that "
                            "the run's checkpoint names; it was deleted or the workdir copied "
                            "in part. Copy it back, or rerun in a new --workdir.")
    try:
      return best.restore_state(step, abstract_variables)
    except CheckpointDamagedError as e:
      raise CheckpointDamagedError(f"{e}; moved it to {best.set_aside(step)}") from e
  finally:
    best.close()


def _check_writable(directory: pathlib.Path) -> None:
  """Fails at the start, not at the first save hours later, where checkpoints cannot go."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise CheckpointError(f"cannot write checkpoints to {directory}: {e}. Pass a --workdir "
                          "on writable storage.") from e


def _shapes(tree: Any) -> dict[str, tuple | None]:
  """``"params/Conv1/kernel" -> shape`` for the model's variables in a state-like tree."""
  def key(entry):
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))
  return {"/".join(key(k) for k in path): getattr(leaf, "shape", None)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if key(path[0]) in ("params", "batch_stats")}


def _check_compatible(saved: Any, target: Any, where: pathlib.Path) -> None:
  saved_shapes, target_shapes = _shapes(saved), _shapes(target)
  missing = sorted(set(target_shapes) - set(saved_shapes))
  extra = sorted(set(saved_shapes) - set(target_shapes))
  if missing or extra:
    raise CheckpointError(
        f"checkpoint {where} does not fit this run's model: the run needs {missing[:4]} "
        f"which the checkpoint lacks, and the checkpoint has {extra[:4]} which the run "
        "lacks. Use another --workdir, or the config that wrote it.")
  for path, shape in target_shapes.items():
    if tuple(saved_shapes[path] or ()) != tuple(shape or ()):
      raise CheckpointError(
          f"checkpoint {where} does not fit this run: {path} has shape "
          f"{tuple(saved_shapes[path])} there but {tuple(shape)} here (another number of "
          "classes, alpha or model?). Use another --workdir, or the config that wrote it.")
