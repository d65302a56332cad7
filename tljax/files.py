"""Writing files that must never be seen half-written: the work directory, atomic writes
(a temporary file beside the target, fsync, rename) and strict JSON."""

import contextlib
import json
import math
import os
import pathlib
import secrets
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np


def to_builtin(obj: Any) -> Any:
  """``json`` fallback: NumPy/JAX scalars and arrays become Python numbers and lists."""
  if isinstance(obj, np.generic):
    return obj.item()
  if hasattr(obj, "__array__"):  # np.ndarray, jax.Array
    return np.asarray(obj).tolist()
  raise TypeError(f"cannot write {type(obj).__name__} {obj!r} as JSON; "
                  "convert it to a number, string, list or dict first.")


def _finite_or_none(obj: Any) -> Any:
  """``obj`` with every NaN or infinite number replaced by None (JSON null)."""
  if hasattr(obj, "__array__"):  # NumPy and JAX scalars and arrays.
    obj = to_builtin(obj)
  if isinstance(obj, Mapping):
    return {k: _finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_none(v) for v in obj]
  if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
    return None
  return obj


def to_json(obj: Any, **kwargs) -> str:
  """``json.dumps`` that also accepts NumPy and JAX scalars and arrays, and writes NaN and
  infinity as ``null`` (strict JSON readers reject ``NaN``)."""
  return json.dumps(_finite_or_none(obj), default=to_builtin, allow_nan=False, **kwargs)


class WorkdirError(ValueError):
  """The work directory cannot be used: not a directory, read-only, not writable."""


class OutputWriteError(RuntimeError):
  """Writing to the work directory failed mid-run (disk full, storage gone)."""


def make_workdir(path: str | os.PathLike) -> pathlib.Path:
  """Creates ``path`` (with its parents) if missing; WorkdirError names the path and cause."""
  path = pathlib.Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    cause = "it is not a directory" if path.exists() and not path.is_dir() else e.strerror or e
    raise WorkdirError(f"--workdir {path} cannot be used: {cause}. Pass a directory on "
                       "writable storage (it is created if missing).") from None
  return path


@contextlib.contextmanager
def write_errors_reported(what: str, path: str | os.PathLike) -> Iterator[None]:
  """Raises an OSError inside the block as OutputWriteError: ``what``, the path, the cause."""
  try:
    yield
  except OSError as e:
    raise OutputWriteError(f"{what} {e.filename or path} failed: {e.strerror or e}. The last "
                           "checkpoint is kept: fix the cause and rerun the same command.") from e


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file next to ``path``; on success it replaces ``path``.

  Readers see the old file or the complete new one, never a partial write.
  The parent directory is created if missing. ``mode`` is "w" or "wb".
  """
  if mode not in ("w", "wb"):
    raise ValueError(f'mode must be "w" or "wb", got {mode!r}.')
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp_path = os.path.join(directory,
                          f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
  # Unlike tempfile.mkstemp's 0o600, this gives the file the umask's usual mode.
  fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp_path)
    raise


def write_json(path: str | os.PathLike, obj: Any) -> str:
  """Writes ``obj`` as indented JSON, atomically; returns the path."""
  with atomic_open(path) as f:
    f.write(to_json(obj, indent=2) + "\n")
  return os.fspath(path)

