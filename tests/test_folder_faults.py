"""Folder datasets under faults: link loops, a damaged decoded cache, a full disk and SIGTERM
while decoding, leftovers of killed decodes, names the split lists cannot hold, tljax's own
folders inside the data folder, tiny classes, skipped images, huge images, old caches."""

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
import warnings

import numpy as np
import pytest
from PIL import Image

from configs import default
from helpers import REPO, load_folder, make_folder, write_image
from tljax import files
from tljax.data import dataset, folder, images, load


def folder_config(root, **data_overrides):
  config = default.get_config()
  config.data.dir = str(root)
  config.data.cache_dir = str(pathlib.Path(root).parent / "cache")
  config.model.input_size = 32
  config.data.update(data_overrides)
  return config


def train_paths(root):
  return [path for path, _ in folder.scan(root).files["train"]]


def counting_decodes(monkeypatch) -> list[str]:
  """The paths decoded from now on (in this process: fewer than 64 files at a time)."""
  decoded, load_stored = [], images.try_load_stored
  monkeypatch.setattr(images, "try_load_stored",
                      lambda path, size: decoded.append(path) or load_stored(path, size))
  return decoded


def temp_files(cache_dir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in cache_dir.glob(".*tmp"))


# ---------------------------------------------------------------------------------------------
# Links.
# ---------------------------------------------------------------------------------------------


def test_link_loops_are_not_followed_and_links_out_still_are(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
  outside = make_folder(tmp_path / "more", {"a": 1})
  (root / "a" / "loop").symlink_to(root)              # Back to the root: b's images under a.
  (root / "b" / "self").symlink_to(root / "b")        # A loop on itself.
  (root / "a" / "more").symlink_to(outside / "a")     # Out of the tree: followed, once.
  (root / "b" / "more_again").symlink_to(outside / "a")
  (outside / "a" / "again").symlink_to(outside / "a")  # A loop outside the tree.
  listing = folder.scan(root)
  assert listing.files == {"train": [("a/000.png", 0), ("a/001.png", 0),
                                     ("a/more/000.png", 0), ("b/000.png", 1),
                                     ("b/001.png", 1)]}
  assert listing.ignored == {
      "link back into the data folder, not followed": ["a/loop", "b/self"],
      "folder reached again through a link, not followed": ["a/more/again", "b/more_again"]}


def test_a_link_loop_is_logged(tmp_path, caplog):
  root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
  (root / "a" / "loop").symlink_to("..")
  caplog.set_level(logging.INFO)
  ds = load_folder(folder_config(root))
  assert len(ds.train) + len(ds.validation) + len(ds.test) == 10
  assert "ignored 1 files (link back into the data folder, not followed), e.g. a/loop" in (
      caplog.text)


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
  folder.decoded_images(root, paths, 16, cache_dir, progress=False)
  [array_path] = cache_dir.glob("*.npy")
  _damage(array_path, kind)
  pixels, failed = folder.decoded_images(root, paths, 16, cache_dir, progress=False)
  assert len(decoded) == 12 and failed == {}
  expected = np.stack([images.load_stored(root / path, 16) for path in paths])
  np.testing.assert_array_equal(pixels, expected)
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and warned[0].startswith(f"the decoded cache {array_path} ")
  assert warned[0].endswith(": decoding the images again")
  again, _ = folder.decoded_images(root, paths, 16, cache_dir, progress=False)  # Verifies.
  assert len(decoded) == 12
  np.testing.assert_array_equal(again, expected)


def test_the_digest_is_in_the_meta_written_last(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
  folder.decoded_images(root, train_paths(root), 8, tmp_path / "cache", progress=False)
  [meta_path] = (tmp_path / "cache").glob("*.json")
  meta = json.loads(meta_path.read_text())
  assert meta["digest"] == folder._digest(meta_path.with_suffix(".npy"))
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
  with pytest.raises(folder.CacheWriteError) as e:
    folder.decoded_images(root, train_paths(root), 16, tmp_path / "cache", progress=False)
  assert isinstance(e.value, files.OutputWriteError)  # main.py: exit 1.
  key = folder.cache_key(root, train_paths(root), 16)
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
    if os.environ.get("CI"):  # CI runs as root: the test must run there, not skip.
      pytest.fail("could not mount a 1 MB tmpfs; CI runs as root and must be able to.")
    pytest.skip("needs root to mount a tmpfs (the ENOSPC path is also tested by monkeypatch)")
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
  script = ("import pathlib, sys; from tljax.data import folder; root = pathlib.Path(sys.argv[1]);"
            "folder.decoded_images(root, [p for p, _ in folder.scan(root).files['train']], 40,"
            " pathlib.Path(sys.argv[2]), progress=False)")
  name, value = mark.split("=")
  process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "d"),
                              str(tmp_path / "cache")], cwd=REPO, stderr=subprocess.PIPE,
                             env={**os.environ, name: value})
  assert _wait_for(lambda: any("spawn_main" in c for c in _marked(mark).values()), 30)
  assert _wait_for(lambda: temp_files(tmp_path / "cache"), 10)
  time.sleep(0.5)
  return process


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers in /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_decode_takes_its_workers_with_it(tmp_path, signum):
  """SIGTERM mid-decode: the process still ends by SIGTERM, with its workers stopped and its
  temporary file removed. SIGKILL: the workers see their parent gone and exit; the temporary
  file is removed by the next decode (or clean_cache)."""
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
      folder.clean_cache(tmp_path / "cache")
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
  folder.decoded_images(root, train_paths(root), 8, cache_dir, progress=False)
  assert temp_files(cache_dir) == sorted(kept)


# ---------------------------------------------------------------------------------------------
# Names the split lists cannot hold.
# ---------------------------------------------------------------------------------------------


def test_a_file_name_with_a_line_break_or_not_utf8_is_refused(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
  write_image(root / "a" / "two\nlines.png")
  write_image(pathlib.Path(os.fsdecode(os.fsencode(root / "b") + b"/caf\xe9.png")))
  with pytest.raises(dataset.DataError) as e:
    folder.scan(root)
  assert str(e.value) == (
      "2 file or folder names with a line break or bytes that are not UTF-8: "
      "'a/two\\nlines.png'; 'b/caf\\udce9.png'. Rename them: a run lists its files in "
      "<workdir>/splits/*.txt, one UTF-8 path a line, to resume on the same splits.")


# ---------------------------------------------------------------------------------------------
# tljax's own folders inside the data folder.
# ---------------------------------------------------------------------------------------------


def _fake_run(workdir: pathlib.Path, split_files=None) -> pathlib.Path:
  """A work directory with what a run writes: split lists, metrics and PNG plots."""
  folder.write_split_lists(workdir / "splits", split_files or {"train": ["a/000.png"]})
  (workdir / "metrics.jsonl").write_text("{}\n")
  write_image(workdir / "confusion_matrix.png")
  return workdir


def test_work_directories_and_the_cache_inside_the_folder_are_left_out(tmp_path, caplog):
  root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
  config = folder_config(root, cache_dir=str(root / "cache"))
  first = load_folder(config)                        # Makes d/cache.
  workdir = _fake_run(root / "runs" / "exp1", first.split_files)  # This run, to resume.
  _fake_run(root / "runs" / "exp0")                  # An earlier run.
  _fake_run(root / "a" / "run")                      # Inside a class folder.
  caplog.set_level(logging.INFO)
  ds = load.load_dataset(config, workdir)
  assert ds.class_names == ("a", "b") and ds.identity == first.identity
  listing = folder.scan(root, [workdir, root / "cache"])
  assert listing.ignored == {
      "work directory or decoded cache, left out": ["a/run", "cache", "runs/exp0",
                                                    "runs/exp1"],
      "folder holding only left-out folders, not a class": ["runs"]}
  assert "ignored 4 files (work directory or decoded cache, left out)" in caplog.text


def test_a_run_folder_beside_train_is_no_stray_split(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 3, "b": 3}, "train")
  make_folder(root, {"a": 1, "b": 1}, "test")
  _fake_run(root / "runs" / "exp0")
  listing = folder.scan(root)
  assert listing.layout == "splits" and sorted(listing.files) == ["test", "train"]
  assert listing.ignored["folder holding only left-out folders, not a class"] == ["runs"]


# ---------------------------------------------------------------------------------------------
# Tiny classes.
# ---------------------------------------------------------------------------------------------


def test_a_class_too_small_for_the_test_split_is_refused(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 6, "b": 1, "c": 4})
  with pytest.raises(dataset.DataError) as e:
    load_folder(folder_config(root))  # validation 0.2, test 0.1.
  assert str(e.value) == (
      "2 classes without an image in train or in test: b (1 images: train 1, validation 0, "
      "test 0); c (4 images: train 3, validation 1, test 0). Each class needs images to train "
      "on and to test on: add images to these classes (with data.validation_split=0.2 and "
      "data.test_split=0.1, a class needs at least 5), or remove their folders.")


def test_a_test_folder_without_a_class_is_refused(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 4, "b": 4}, "train")
  make_folder(root, {"a": 2}, "test")
  with pytest.raises(dataset.DataError, match=r"^1 classes without an image in train or in "
                     r"test: b \(4 images: train 3, validation 1, test 0\)\. Each class needs "
                     r"images to train on and to test on: add images to these classes, or"):
    load_folder(folder_config(root))


def test_a_class_without_a_validation_image_is_a_warning(tmp_path, caplog):
  root = make_folder(tmp_path / "d", {"a": 8, "b": 4})
  ds = load_folder(folder_config(root, validation_split=0.1, test_split=0.25))
  assert np.bincount(ds.validation.labels, minlength=2).tolist() == [1, 0]
  assert ("d: 1 classes have no validation image, so their validation accuracy is not "
          "measured: b (4 images: train 3, validation 0, test 1)") in caplog.text


def test_a_class_emptied_by_skipped_images_is_refused(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
  for i in range(5):
    (root / "b" / f"{i:03d}.png").write_bytes(b"")
  with pytest.raises(dataset.DataError, match=r"^1 classes without an image in train or in "
                     r"test: b \(0 images: train 0, validation 0, test 0\)"):
    load_folder(folder_config(root, skip_bad_images=True))


# ---------------------------------------------------------------------------------------------
# Skipped images and the split lists.
# ---------------------------------------------------------------------------------------------


def test_skipped_images_stay_out_of_the_split_lists_and_a_resume_repeats_the_run(
    tmp_path, monkeypatch, caplog):
  root = make_folder(tmp_path / "d", {"a": 8, "b": 8})
  (root / "a" / "005.png").write_text("not a png")
  splits_dir = tmp_path / "run" / "splits"
  config = folder_config(root, skip_bad_images=True)
  first = load_folder(config, splits_dir)
  assert first.skipped == ("a/005.png",) and first.split_files["skipped"] == ("a/005.png",)
  assert all("a/005.png" not in first.split_files[s] for s in folder.SPLITS)
  assert sum(len(first.split_files[s]) for s in folder.SPLITS) == 15
  folder.write_split_lists(splits_dir, first.split_files)
  assert "a/005.png" not in (splits_dir / "train.txt").read_text()
  assert (splits_dir / "skipped.txt").read_text() == "a/005.png\n"
  decoded = counting_decodes(monkeypatch)
  caplog.set_level(logging.INFO)
  again = load_folder(config, splits_dir)
  assert decoded == [] and "decoded images from the cache" in caplog.text  # The same cache.
  assert "not in this run's split lists" not in caplog.text
  assert again.identity == first.identity and again.skipped == first.skipped
  assert again.split_files == first.split_files
  np.testing.assert_array_equal(again.train.images, first.train.images)
  np.testing.assert_array_equal(again.train.labels, first.train.labels)


def test_a_resume_after_the_skipped_file_is_removed_is_the_same_run(tmp_path):
  root = make_folder(tmp_path / "d", {"a": 8, "b": 8})
  (root / "a" / "005.png").write_text("not a png")
  splits_dir = tmp_path / "run" / "splits"
  config = folder_config(root, skip_bad_images=True)
  first = load_folder(config, splits_dir)
  folder.write_split_lists(splits_dir, first.split_files)
  (root / "a" / "005.png").unlink()
  config.data.skip_bad_images = False  # Nothing left to skip.
  again = load_folder(config, splits_dir)
  assert again.identity == first.identity and again.split_files == first.split_files
  np.testing.assert_array_equal(again.train.images, first.train.images)


# ---------------------------------------------------------------------------------------------
# Huge images.
# ---------------------------------------------------------------------------------------------


def test_a_large_image_decodes_without_pillows_warning_and_a_huge_one_is_a_bad_image(
    tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60)  # Warns above 60 pixels, refuses 120.
  large = write_image(tmp_path / "large.png", size=(8, 10))
  huge = write_image(tmp_path / "huge.png", size=(12, 12))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert images.load_stored(large, 8).shape == (8, 8, 3)
    assert images.load_image(large).shape == (8, 10, 3)
  assert [w.category for w in caught] == []
  pixels, cause = images.try_load_stored(str(huge), 8)
  assert pixels is None and cause == (
      "more than 120 pixels, Pillow's limit against decompression bombs (if it is a real "
      "photo, make it smaller)")


# ---------------------------------------------------------------------------------------------
# Old caches.
# ---------------------------------------------------------------------------------------------


def test_a_new_cache_replaces_the_one_it_supersedes_and_says_where_they_are(tmp_path, caplog):
  root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
  other = make_folder(tmp_path / "e", {"a": 2, "b": 2})
  cache_dir = tmp_path / "cache"
  folder.decoded_images(other, train_paths(other), 8, cache_dir, progress=False)
  folder.decoded_images(root, train_paths(root), 8, cache_dir, progress=False)
  folder.decoded_images(root, train_paths(root), 16, cache_dir, progress=False)  # Another size.
  assert len(list(cache_dir.glob("*.npy"))) == 3
  write_image(root / "a" / "002.png")
  caplog.set_level(logging.INFO)
  folder.decoded_images(root, train_paths(root), 8, cache_dir, progress=False)
  assert len(list(cache_dir.glob("*.npy"))) == len(list(cache_dir.glob("*.json"))) == 3
  [line] = [r.getMessage() for r in caplog.records if "decoded caches" in r.getMessage()]
  assert line.startswith(f"{cache_dir}: 3 decoded caches, ") and (
      f"(removed 1 older caches of {root}, " in line) and "--clean-cache" in line


def test_clean_cache(tmp_path, capsys):
  root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
  cache_dir = tmp_path / "cache"
  folder.decoded_images(root, train_paths(root), 8, cache_dir, progress=False)
  folder.decoded_images(root, train_paths(root), 16, cache_dir, progress=False)
  (cache_dir / "notes.json").write_text("{}")  # Not a cache: left alone.
  [old, _] = sorted(cache_dir.glob("*.json"), key=lambda p: p.name == "notes.json")[:2]
  os.utime(old, (time.time() - 3 * 86400,) * 2)  # Not opened for 3 days.
  assert folder.clean_cache(cache_dir, older_than_days=2)[0] == 1
  assert not old.exists() and not old.with_suffix(".npy").exists()
  assert folder.main(["--clean-cache", "--cache-dir", str(cache_dir)]) == 0
  assert capsys.readouterr().out.startswith(f"{cache_dir}: removed 1 decoded caches, ")
  assert sorted(p.name for p in cache_dir.iterdir()) == ["notes.json"]
