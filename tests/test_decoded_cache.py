"""The decoded cache (tljax.data.decoded_cache): reused, rebuilt when a file changes or the
cache is damaged, cleaned up after a full disk, a SIGTERM or a kill, old caches removed."""

import errno
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from helpers import (REPO, counting_decodes, make_folder, train_paths, unavailable,
                     write_image)
from tljax import files
from tljax.data import decoded_cache, images


def temp_files(cache_dir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in cache_dir.glob(".*tmp"))


# ---------------------------------------------------------------------------------------------
# Reuse and rebuilding.
# ---------------------------------------------------------------------------------------------


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
  root = make_folder(tmp_path / "d", {"a": 3, "b": 3}, ext="bmp")
  paths, cache = train_paths(root), tmp_path / "cache"
  decoded = counting_decodes(monkeypatch)
  first, failed = decoded_cache.decoded_images(root, paths, 16, cache, progress=False)
  assert first.shape == (6, 16, 16, 3) and first.dtype == np.uint8 and failed == {}
  assert len(decoded) == 6 and not temp_files(cache)
  again, _ = decoded_cache.decoded_images(root, paths, 16, cache, progress=False)
  assert len(decoded) == 6 and isinstance(again, np.memmap)
  np.testing.assert_array_equal(again, first)
  write_image(root / paths[0], label=2)  # Another colour: new size or mtime.
  os.utime(root / paths[0], ns=(1, 1))
  rebuilt, _ = decoded_cache.decoded_images(root, paths, 16, cache, progress=False)
  assert len(decoded) == 12
  assert not np.array_equal(rebuilt[0], first[0])
  np.testing.assert_array_equal(rebuilt[1:], first[1:])


def test_parallel_decode_matches_serial(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 40, "b": 30}, ext="jpg")
  paths = train_paths(root)
  pooled, _ = decoded_cache.decoded_images(root, paths, 8, tmp_path / "cache", progress=False)
  serial = np.stack([images.load_stored(root / p, 8) for p in paths])
  np.testing.assert_array_equal(pooled, serial)


# ---------------------------------------------------------------------------------------------
# A damaged decoded cache.
# ---------------------------------------------------------------------------------------------


def _damage(path: pathlib.Path, kind: str) -> None:
  stat = path.stat()
  if kind == "zeroed":  # In place: the same size and modification time.
    offset = len(path.read_bytes()) - 6 * 16 * 16 * 3
    with open(path, "r+b") as f:
      f.seek(offset)
      f.write(bytes(stat.st_size - offset))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  elif kind == "truncated":
    os.truncate(path, stat.st_size // 2)
  elif kind == "wrong_shape":
    np.save(path, np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("kind", ["zeroed", "truncated", "wrong_shape"])
def test_a_damaged_cache_is_named_and_rebuilt(tmp_path, monkeypatch, caplog, kind):
  root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
  paths, cache_dir = train_paths(root), tmp_path / "cache"
  decoded = counting_decodes(monkeypatch)
  decoded_cache.decoded_images(root, paths, 16, cache_dir, progress=False)
  [array_path] = cache_dir.glob("*.npy")
  _damage(array_path, kind)
  pixels, failed = decoded_cache.decoded_images(root, paths, 16, cache_dir, progress=False)
  assert len(decoded) == 12 and failed == {}
  expected = np.stack([images.load_stored(root / path, 16) for path in paths])
  np.testing.assert_array_equal(pixels, expected)
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and warned[0].startswith(f"the decoded cache {array_path} ")
  assert warned[0].endswith(": decoding the images again")
  again, _ = decoded_cache.decoded_images(root, paths, 16, cache_dir, progress=False)  # Verifies.
  assert len(decoded) == 12
  np.testing.assert_array_equal(again, expected)


def test_the_digest_is_in_the_meta_written_last(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
  decoded_cache.decoded_images(root, train_paths(root), 8, tmp_path / "cache", progress=False)
  [meta_path] = (tmp_path / "cache").glob("*.json")
  meta = json.loads(meta_path.read_text())
  assert meta["digest"] == decoded_cache._digest(meta_path.with_suffix(".npy"))
  assert meta["digest"].startswith("crc32:") and meta["root"] == str(root.resolve())


# ---------------------------------------------------------------------------------------------
# A full disk, SIGTERM and leftovers while decoding.
# ---------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_error_naming_the_cache_and_leaves_no_temp_file(tmp_path,
                                                                          monkeypatch):
  root = make_folder(tmp_path / "d", {"a": 3, "b": 3})

  def full(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "posix_fallocate", full, raising=False)  # None on macOS.
  decoded = counting_decodes(monkeypatch)
  with pytest.raises(decoded_cache.CacheWriteError) as e:
    decoded_cache.decoded_images(root, train_paths(root), 16, tmp_path / "cache", progress=False)
  assert isinstance(e.value, files.OutputWriteError)  # main.py: exit 1.
  key = decoded_cache.cache_key(root, train_paths(root), 16)
  assert str(e.value) == (
      f"writing the decoded cache {tmp_path / 'cache' / key}.npy (4.5 KB) failed: No space "
      "left on device. Free space there, or set --config.data.cache_dir to a folder with room.")
  assert decoded == [] and list((tmp_path / "cache").iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MB tmpfs (tests run as root where they can mount one)."""
  mount = tmp_path / "small"
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                          str(mount)], capture_output=True).returncode:
    unavailable("needs root to mount a tmpfs (the ENOSPC path is also tested by monkeypatch)",
                "could not mount a 1 MB tmpfs; CI runs as root and must be able to.")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=True)


def test_main_exits_1_when_the_cache_disk_is_full(tmp_path, small_disk):
  """Not a SIGBUS (exit 135) when a page of the memory-mapped cache is first written."""
  root = make_folder(tmp_path / "d", {"a": 6, "b": 6})  # 12 images of 256x256x3: 2.4 MB.
  result = subprocess.run(
      [sys.executable, "main.py", "--config=configs/default.py",
       f"--workdir={tmp_path / 'run'}", f"--config.data.dir={root}",
       f"--config.data.cache_dir={small_disk}", "--config.data.image_size=256",
       "--config.model.weights=none"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if " writing the decoded cache " in line]
  assert len(errors) == 1 and f"{small_disk}/" in errors[0], result.stderr[-2000:]
  assert errors[0].endswith("failed: No space left on device. Free space there, or set "
                            "--config.data.cache_dir to a folder with room.")
  assert "Traceback" not in result.stderr and list(small_disk.iterdir()) == []


def _marked(mark: str) -> dict[int, str]:
  """pid -> command line of the processes whose environment holds ``mark``."""
  found = {}
  for entry in os.scandir("/proc"):
    try:
      if entry.name.isdigit() and mark.encode() in pathlib.Path(entry.path,
                                                               "environ").read_bytes():
        found[int(entry.name)] = pathlib.Path(entry.path, "cmdline").read_bytes().decode()
    except OSError:
      pass
  return found


def _wait_for(condition, timeout: float) -> bool:
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


def _start_long_decode(tmp_path: pathlib.Path, mark: str) -> subprocess.Popen:
  """A process decoding, in a pool, seconds' worth of big PNGs (hard links to one noise PNG,
  about 80 ms each) into ``tmp_path/cache``; its environment (and its workers') holds ``mark``.
  Returns once the workers are decoding."""
  png = tmp_path / "big.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), np.uint8)).save(png)
  for i in range(64 * (os.cpu_count() or 1)):  # Seconds of work for every worker.
    (tmp_path / "d" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
    os.link(png, tmp_path / "d" / "ab"[i % 2] / f"{i:04d}.png")
  script = ("import pathlib, sys; from tljax.data import decoded_cache, folder;"
            "root = pathlib.Path(sys.argv[1]); paths = [p for p, _ in folder.scan(root).files["
            "'train']]; decoded_cache.decoded_images(root, paths, 40, pathlib.Path(sys.argv[2]),"
            " progress=False)")
  name, value = mark.split("=")
  process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "d"),
                              str(tmp_path / "cache")], cwd=REPO, stderr=subprocess.PIPE,
                             env={**os.environ, name: value})
  assert _wait_for(lambda: any("spawn_main" in c for c in _marked(mark).values()), 30)
  assert _wait_for(lambda: temp_files(tmp_path / "cache"), 10)
  time.sleep(0.5)
  return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_decode_takes_its_workers_with_it(tmp_path, signum):
  """SIGTERM mid-decode: the process still ends by SIGTERM, with its workers stopped and its
  temporary file removed. SIGKILL: the workers see their parent gone and exit; the temporary
  file is removed by the next decode (or clean_cache)."""
  if not os.path.isdir("/proc"):
    unavailable("finds the decode workers in /proc (Linux)",
                "/proc is missing; CI runs on Linux, where the test finds the decode workers.")
  mark = f"TLJAX_TEST_MARK={uuid.uuid4().hex}"
  process = _start_long_decode(tmp_path, mark)
  try:
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=15)
    assert process.returncode == -signum, stderr.decode()[-2000:]
    assert _wait_for(lambda: not _marked(mark), 5), _marked(mark)
    assert not list((tmp_path / "cache").glob("*.npy"))
    if signum == signal.SIGTERM:
      assert temp_files(tmp_path / "cache") == []
      assert "SIGTERM while decoding images: stopped the decode workers" in stderr.decode()
    else:
      assert len(temp_files(tmp_path / "cache")) == 1
      decoded_cache.clean_cache(tmp_path / "cache")
      assert temp_files(tmp_path / "cache") == []
  finally:
    process.kill()
    for pid in _marked(mark):
      os.kill(pid, signal.SIGKILL)


def test_temp_files_of_killed_decodes_are_removed(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
  cache_dir = tmp_path / "cache"
  cache_dir.mkdir()
  dead = subprocess.Popen(["true"])
  dead.wait()
  key, host = "0123456789abcdef0123456789abcdef", socket.gethostname()
  leftovers = [f".{key}.{dead.pid}@{host}.npy.tmp", f".{key}.{dead.pid}.npy.tmp"]
  kept = [f".{key}.{os.getpid()}@{host}.npy.tmp",  # Alive.
          f".{key}.{dead.pid}@another-{host}.npy.tmp", ".notes.tmp"]  # Not ours to judge.
  for name in leftovers + kept:
    (cache_dir / name).write_bytes(b"x")
  decoded_cache.decoded_images(root, train_paths(root), 8, cache_dir, progress=False)
  assert temp_files(cache_dir) == sorted(kept)


# ---------------------------------------------------------------------------------------------
# Old caches.
# ---------------------------------------------------------------------------------------------


def test_a_new_cache_replaces_the_one_it_supersedes_and_says_where_they_are(tmp_path, caplog):
  root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
  other = make_folder(tmp_path / "e", {"a": 2, "b": 2})
  cache_dir = tmp_path / "cache"
  decoded_cache.decoded_images(other, train_paths(other), 8, cache_dir, progress=False)
  decoded_cache.decoded_images(root, train_paths(root), 8, cache_dir, progress=False)
  decoded_cache.decoded_images(root, train_paths(root), 16, cache_dir,  # Another size.
                               progress=False)
  assert len(list(cache_dir.glob("*.npy"))) == 3
  write_image(root / "a" / "002.png")
  caplog.set_level(logging.INFO)
  decoded_cache.decoded_images(root, train_paths(root), 8, cache_dir, progress=False)
  assert len(list(cache_dir.glob("*.npy"))) == len(list(cache_dir.glob("*.json"))) == 3
  [line] = [r.getMessage() for r in caplog.records if "decoded caches" in r.getMessage()]
  assert line.startswith(f"{cache_dir}: 3 decoded caches, ") and (
      f"(removed 1 older caches of {root}, " in line) and "decoded_cache --clean" in line


def test_clean_cache(tmp_path, capsys):
  root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
  cache_dir = tmp_path / "cache"
  decoded_cache.decoded_images(root, train_paths(root), 8, cache_dir, progress=False)
  decoded_cache.decoded_images(root, train_paths(root), 16, cache_dir, progress=False)
  (cache_dir / "notes.json").write_text("{}")  # Not a cache: left alone.
  [old, _] = sorted(cache_dir.glob("*.json"), key=lambda p: p.name == "notes.json")[:2]
  os.utime(old, (time.time() - 3 * 86400,) * 2)  # Not opened for 3 days.
  assert decoded_cache.clean_cache(cache_dir, older_than_days=2)[0] == 1
  assert not old.exists() and not old.with_suffix(".npy").exists()
  assert decoded_cache.main(["--clean", "--cache-dir", str(cache_dir)]) == 0
  assert capsys.readouterr().out.startswith(f"{cache_dir}: removed 1 decoded caches, ")
  assert sorted(p.name for p in cache_dir.iterdir()) == ["notes.json"]
