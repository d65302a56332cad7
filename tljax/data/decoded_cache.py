"""The decoded cache: a folder dataset's images decoded once, in parallel on every core, to
square uint8 pixels of a stored size, kept in a memory-mapped ``.npy`` under
``data.cache_dir``.

A cache is keyed by its files (paths, sizes, modification times) and the stored size: a later
run with the same files starts at once, and one changed file rebuilds it (and removes the cache
it supersedes). Its ``.json``, written last, holds a CRC-32 of the ``.npy``, checked whenever it
is opened: a damaged cache is rebuilt, with a warning. A decode writes through a temporary file
that it removes on every exit path (an exception, Ctrl-C, SIGTERM); those of killed decodes are
removed by the next one. A full disk is one error naming the path.

``python -m tljax.data.decoded_cache --clean [--older-than DAYS]`` removes caches.
"""

import argparse
import concurrent.futures
import contextlib
import errno
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import pathlib
import re
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import tqdm

from tljax import download, files
from tljax.data import images

DECODE_VERSION = 1          # Part of the cache key: bump when decoding changes its pixels.
_PARALLEL_FROM = 64         # Fewer files decode in this process: a pool costs more to start.


def default_cache_dir() -> pathlib.Path:
  """``$TLJAX_CACHE/decoded``, else ``~/.cache/tljax/decoded``."""
  return download.default_cache_dir() / "decoded"


def cache_key(root: pathlib.Path, paths: list[str], size: int) -> str:
  """Names the decoded cache of ``paths`` (relative to ``root``) at ``size``: changes with
  any file's path, size or modification time."""
  stats = []
  for path in paths:
    try:
      st = (root / path).stat()
      stats.append((path, st.st_size, st.st_mtime_ns))
    except OSError:
      stats.append((path, -1, -1))  # Reported by the decoder.
  text = json.dumps([DECODE_VERSION, str(root.resolve()), size, stats])
  return hashlib.sha256(text.encode()).hexdigest()[:32]


class CacheWriteError(files.OutputWriteError):
  """The decoded cache cannot be written (a full disk, storage gone): a run failure, exit 1."""


class _Unusable(Exception):
  """A decoded cache that cannot be used; the message says why."""


class _Terminated(BaseException):
  """SIGTERM during a decode, raised in the main thread so that the decode cleans up."""


_CACHE_FILE = re.compile(r"^[0-9a-f]{32}\.(npy|json)$")
_TEMP_FILE = re.compile(r"^\.([0-9a-f]{32})\.(\d+)(?:@(.*))?\.npy\.tmp$")  # key, pid, host.


def _amount(nbytes: int) -> str:
  """``nbytes`` in GB, MB or KB, whichever shows it best with one decimal."""
  unit = next((u for u in (3, 2, 1) if nbytes >= 2**(10 * u) // 10), 0)
  return f"{nbytes / 2**(10 * unit):.1f} {('KB', 'MB', 'GB')[unit - 1]}" if unit else (
      f"{nbytes} bytes")


def _digest(path: pathlib.Path) -> str:
  """``crc32:<hex>`` of the file: catches a damaged cache (zeroed, truncated, flipped bits),
  faster than a cryptographic hash; not meant to resist someone who edits it on purpose."""
  crc, buffer = 0, bytearray(8 << 20)
  view = memoryview(buffer)
  with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buffer):
      crc = zlib.crc32(view[:n], crc)
  return f"crc32:{crc:08x}"


@contextlib.contextmanager
def _write_errors(path: pathlib.Path, nbytes: int) -> Iterator[None]:
  """An OSError inside the block becomes a CacheWriteError naming ``path`` and the fix."""
  try:
    yield
  except OSError as e:
    full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    fix = ("Free space there, or set --config.data.cache_dir to a folder with room" if full
           else "Check that it can be written, or set --config.data.cache_dir to another folder")
    raise CacheWriteError(f"writing the decoded cache {path} ({_amount(nbytes)}) failed: "
                          f"{e.strerror or e}. {fix}.") from e


def _allocate(f, size: int) -> None:
  """Allocates the first ``size`` bytes of the open file ``f`` on disk: a full disk is an
  OSError now, not a SIGBUS when a page of its memory map is first written."""
  if hasattr(os, "posix_fallocate"):
    try:
      os.posix_fallocate(f.fileno(), 0, size)
      return
    except OSError as e:
      if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
  f.seek(0, os.SEEK_END)  # No fallocate here (macOS, some file systems): write zeros.
  zeros = bytes(1 << 20)
  for _ in range(f.tell(), size, len(zeros)):
    f.write(zeros[:size - f.tell()])
  f.flush()
  os.fsync(f.fileno())


def _new_npy(path: pathlib.Path, shape: tuple[int, ...]) -> np.memmap:
  """A new uint8 ``.npy`` of ``shape``, its space allocated, memory-mapped for writing."""
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False, "shape": shape}
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, header)
    _allocate(f, f.tell() + math.prod(shape))
  return np.lib.format.open_memmap(path, "r+")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's.
    return True
  return True


def _remove_dead_temps(cache_dir: pathlib.Path) -> None:
  """Removes the temporary files of decodes on this host whose process is gone (killed)."""
  host, removed = socket.gethostname(), 0
  for path in cache_dir.glob(".*.npy.tmp"):
    match = _TEMP_FILE.match(path.name)
    if match and match[3] in (None, host) and not _alive(int(match[2])):
      with contextlib.suppress(OSError):
        removed += path.stat().st_size
        path.unlink()
  if removed:
    logging.info("%s: removed %s of unfinished caches of decodes that were killed", cache_dir,
                 _amount(removed))


def _remove_cache(meta_path: pathlib.Path) -> int:
  """Removes a cache, its meta first (so that it is never taken as finished); returns the
  bytes freed."""
  freed = 0
  for path in (meta_path, meta_path.with_suffix(".npy")):
    with contextlib.suppress(OSError):
      freed += path.stat().st_size
      path.unlink()
  return freed


def _open_cache(array_path: pathlib.Path, meta_path: pathlib.Path,
                shape: tuple[int, ...]) -> tuple[np.ndarray, dict[str, str]]:
  """A finished cache's images (memory-mapped) and failed files; raises _Unusable saying why
  it cannot be used: its files cannot be read, it has another shape, or not its digest."""
  try:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    digest, failed = meta.get("digest"), dict(meta["failed"])
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    raise _Unusable(f"cannot be used: its {meta_path.name} cannot be read ({e})") from None
  if digest is None:
    raise _Unusable("has no checksum (written by an older tljax)")
  try:
    pixels = np.load(array_path, mmap_mode="r")
  except (OSError, ValueError, EOFError) as e:
    raise _Unusable(f"cannot be opened ({e})") from None
  if pixels.dtype != np.uint8 or pixels.shape != shape:
    raise _Unusable(f"holds {pixels.dtype} {pixels.shape}, not uint8 {shape}")
  if _digest(array_path) != digest:
    raise _Unusable(f"is damaged: it does not match its checksum ({digest})")
  with contextlib.suppress(OSError):
    os.utime(meta_path)  # Marks it used, for clean_cache(older_than_days=...).
  return pixels, failed


@contextlib.contextmanager
def _decode_pool() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
  """One decode process per core, spawned (the caller runs threads), each exiting if this
  process dies; on any exception (KeyboardInterrupt, SIGTERM) they are terminated at once."""
  pool = concurrent.futures.ProcessPoolExecutor(
      os.cpu_count(), mp_context=multiprocessing.get_context("spawn"),
      initializer=images.exit_with_parent, initargs=(os.getpid(),))
  try:
    yield pool
  except BaseException:
    workers = list((pool._processes or {}).values())  # noqa: SLF001 - no public way before 3.14.
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:  # A worker blocked writing to the pool's pipe would never exit.
      worker.terminate()
    for worker in workers:
      worker.join(timeout=5)
    raise
  pool.shutdown()


def _decode_into(out: np.ndarray, root: pathlib.Path, paths: list[str], size: int,
                 progress: bool) -> dict[str, str]:
  """Decodes ``paths`` into the rows of ``out``, in a pool for many files; returns path -> why,
  for those that failed."""
  jobs, failed = [str(root / path) for path in paths], {}
  with contextlib.ExitStack() as stack:
    if len(jobs) < _PARALLEL_FROM:
      results = map(images.try_load_stored, jobs, itertools.repeat(size))
    else:
      pool = stack.enter_context(_decode_pool())
      results = pool.map(images.try_load_stored, jobs, itertools.repeat(size), chunksize=16)
    for i, (pixels, error) in enumerate(tqdm.tqdm(
        results, total=len(paths), unit="image", desc=f"decoding {root.name}",
        disable=not (progress and sys.stderr.isatty()))):
      if error is None:
        out[i] = pixels
      else:
        failed[paths[i]] = error
  return failed


@contextlib.contextmanager
def _sigterm_stops_decode() -> Iterator[None]:
  """Where SIGTERM would end the process at once (its default action), makes it raise in the
  main thread inside the block, so that the decode stops its workers and removes its temporary
  file; then raises the signal again, to end the process as it would have (143)."""
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
    yield
    return

  def stop(signum, frame):
    raise _Terminated

  signal.signal(signal.SIGTERM, stop)
  try:
    yield
  except _Terminated:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.warning("SIGTERM while decoding images: stopped the decode workers and removed the "
                    "unfinished cache; rerun the same command to start again.")
    signal.raise_signal(signal.SIGTERM)
    raise SystemExit(128 + signal.SIGTERM) from None  # Only if the signal is blocked.
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_cache(array_path: pathlib.Path, root: pathlib.Path, paths: list[str],
                 size: int, progress: bool) -> dict[str, str]:
  """Decodes ``paths`` into the cache ``array_path`` through a temporary file (removed
  whatever happens), then writes its meta with the digest, last; returns the failed files."""
  shape = (len(paths), size, size, 3)
  nbytes = math.prod(shape)
  tmp_path = array_path.with_name(
      f".{array_path.stem}.{os.getpid()}@{socket.gethostname()}.npy.tmp")
  try:
    with _write_errors(array_path, nbytes):
      out = _new_npy(tmp_path, shape)
    failed = _decode_into(out, root, paths, size, progress)
    with _write_errors(array_path, nbytes):
      out.flush()
      del out
      digest = _digest(tmp_path)
      os.replace(tmp_path, array_path)
      files.write_json(array_path.with_suffix(".json"), {
          "root": str(root.resolve()), "size": size, "files": len(paths), "failed": failed,
          "digest": digest})  # Written last: marks the cache done.
  finally:
    tmp_path.unlink(missing_ok=True)
  return failed


def _remove_superseded(cache_dir: pathlib.Path, root: pathlib.Path, size: int, key: str):
  """Removes the caches of ``root`` at ``size`` but ``key`` (their files have changed since),
  then logs what the cache folder holds."""
  real_root, removed, freed = os.path.realpath(root), 0, 0
  for meta_path in cache_dir.glob("*.json"):
    if meta_path.stem == key or not _CACHE_FILE.match(meta_path.name):
      continue
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
      meta = json.loads(meta_path.read_text(encoding="utf-8"))
      if meta["size"] == size and os.path.realpath(meta["root"]) == real_root:
        freed += _remove_cache(meta_path)
        removed += 1
  caches = [p for p in cache_dir.iterdir() if _CACHE_FILE.match(p.name)]
  logging.info("%s: %d decoded caches, %s%s; `python -m tljax.data.decoded_cache --clean "
               "--older-than DAYS` removes those unused for DAYS days", cache_dir,
               sum(p.suffix == ".json" for p in caches),
               _amount(sum(p.stat().st_size for p in caches)),
               f" (removed {removed} older caches of {root}, {_amount(freed)})" if removed else "")


def decoded_images(root: pathlib.Path, paths: list[str], size: int,
                   cache_dir: pathlib.Path, progress: bool = True
                   ) -> tuple[np.ndarray, dict[str, str]]:
  """uint8 [len(paths), size, size, 3] (memory-mapped, read-only) and the files that could
  not be decoded (path -> why; their rows are zeros), from the cache or decoded into it.

  A cache that cannot be opened or does not match its digest is decoded again, with a warning.
  """
  key = cache_key(root, paths, size)
  array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
  shape = (len(paths), size, size, 3)
  if meta_path.is_file():  # Written last: the cache is finished.
    try:
      pixels, failed = _open_cache(array_path, meta_path, shape)
    except _Unusable as e:
      logging.warning("the decoded cache %s %s: decoding the images again", array_path, e)
      _remove_cache(meta_path)
    else:
      logging.info("%s: %d decoded images from the cache %s", root, len(paths), array_path)
      return pixels, failed
  with _write_errors(cache_dir, math.prod(shape)):
    cache_dir.mkdir(parents=True, exist_ok=True)
  _remove_dead_temps(cache_dir)
  started = time.perf_counter()
  with _sigterm_stops_decode():
    failed = _write_cache(array_path, root, paths, size, progress)
  seconds = time.perf_counter() - started
  logging.info("%s: decoded %d images in %.1f s (%.0f images/s) to %s", root, len(paths),
               seconds, len(paths) / seconds, array_path)
  _remove_superseded(cache_dir, root, size, key)
  return np.load(array_path, mmap_mode="r"), failed


def clean_cache(cache_dir: str | os.PathLike | None = None,
                older_than_days: float = 0.0) -> tuple[int, int]:
  """Removes the decoded caches in ``cache_dir`` (default :func:`default_cache_dir`) that no
  run opened for ``older_than_days`` days (0: all), and the temporary files of killed decodes;
  returns the caches removed and the bytes freed."""
  cache_dir = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  if not cache_dir.is_dir():
    return 0, 0
  _remove_dead_temps(cache_dir)
  cutoff, removed, freed = time.time() - older_than_days * 86400, 0, 0
  for path in sorted(cache_dir.iterdir()):
    meta_path = path.with_suffix(".json")
    if not _CACHE_FILE.match(path.name) or (path.suffix == ".npy" and meta_path.exists()):
      continue  # Not a cache; an array goes with its meta (alone, it is unfinished).
    with contextlib.suppress(OSError):
      if path.stat().st_mtime <= cutoff:
        freed += _remove_cache(meta_path)
        removed += path.suffix == ".json"
  return removed, freed




def main(argv: Sequence[str] | None = None) -> int:
  """Removes decoded caches; returns the exit code."""
  parser = argparse.ArgumentParser(
      prog="python -m tljax.data.decoded_cache",
      description="Removes the decoded caches of folder datasets (a run decodes again what "
                  "it needs).")
  parser.add_argument("--clean", action="store_true", required=True,
                      help="remove the caches (and the unfinished ones of killed decodes)")
  parser.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                      help="only those no run opened for DAYS days (default 0: all)")
  parser.add_argument("--cache-dir", default="", metavar="DIR",
                      help="the folder (data.cache_dir; default $TLJAX_CACHE/decoded or "
                           "~/.cache/tljax/decoded)")
  args = parser.parse_args(argv)
  cache_dir = args.cache_dir or default_cache_dir()
  removed, freed = clean_cache(cache_dir, args.older_than)
  print(f"{cache_dir}: removed {removed} decoded caches, {_amount(freed)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
