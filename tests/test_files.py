"""tljax.files: atomic writes never leave a partial file, strict JSON, the work directory."""

import errno
import json
import math
import os

import numpy as np
import pytest

from tljax import files

# ---------------------------------------------------------------- atomic_open, write_json


def test_write_json_round_trips_with_indent(tmp_path):
  path = tmp_path / "results" / "summary.json"
  obj = {"test_accuracy": np.float32(0.5), "confusion": np.eye(2, dtype=np.int64),
         "classes": ["a", "b"]}
  assert files.write_json(path, obj) == os.fspath(path)
  assert path.read_text() == (
      '{\n  "test_accuracy": 0.5,\n  "confusion": [\n    [\n      1,\n      0\n    ],\n'
      '    [\n      0,\n      1\n    ]\n  ],\n  "classes": [\n    "a",\n    "b"\n  ]\n}\n')
  assert os.listdir(path.parent) == ["summary.json"]


def test_write_json_replaces_atomically_and_keeps_the_old_file_on_failure(tmp_path):
  path = tmp_path / "summary.json"
  files.write_json(path, {"epoch": 1})
  files.write_json(path, {"epoch": 2})
  assert json.loads(path.read_text()) == {"epoch": 2}
  with pytest.raises(TypeError, match="cannot write set"):
    files.write_json(path, {"epoch": {3}})
  assert json.loads(path.read_text()) == {"epoch": 2}
  assert os.listdir(tmp_path) == ["summary.json"]


def test_atomic_open_gives_the_umask_mode_not_mkstemp_0600(tmp_path):
  umask = os.umask(0o022)
  try:
    path = files.write_json(tmp_path / "a.json", {})
  finally:
    os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o644


def test_atomic_open_rejects_other_modes(tmp_path):
  with pytest.raises(ValueError, match='mode must be "w" or "wb", got \'a\''):
    with files.atomic_open(tmp_path / "x", "a"):
      pass



def test_non_finite_numbers_are_written_as_null():
  assert files.to_json({"loss": float("nan"), "x": np.array([1.0, np.inf]),
                            "y": np.float32("-inf"), "n": np.int64(3)}) == \
      '{"loss": null, "x": [1.0, null], "y": null, "n": 3}'


def _no_constants(name):
  raise ValueError(f"{name} is not strict JSON")


def test_write_json_writes_strict_json(tmp_path):
  path = files.write_json(tmp_path / "s.json", {"loss": np.float32("nan"), "best": [math.inf],
                                                "step": np.int32(7), "ok": 0.5})
  text = open(path).read()
  assert json.loads(text, parse_constant=_no_constants) == {"loss": None, "best": [None],
                                                             "step": 7, "ok": 0.5}
  assert "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize("error", [RuntimeError("failed mid-write"), KeyboardInterrupt()],
                         ids=["exception", "ctrl_c"])
def test_atomic_open_never_leaves_a_partial_file(tmp_path, error):
  path = tmp_path / "out.bin"
  path.write_bytes(b"old")
  with pytest.raises(type(error)):
    with files.atomic_open(path, "wb") as f:
      f.write(b"new, half")
      assert path.read_bytes() == b"old"  # Readers see the old file while it is written.
      raise error
  assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
  with pytest.raises(type(error)):
    with files.atomic_open(tmp_path / "new.txt") as f:
      f.write("half")
      raise error
  assert os.listdir(tmp_path) == ["out.bin"]  # No new file and no temporary one.
  with files.atomic_open(path, "wb") as f:
    f.write(b"complete")
  assert path.read_bytes() == b"complete" and os.listdir(tmp_path) == ["out.bin"]


def test_to_builtin_names_what_it_cannot_write():
  assert files.to_builtin(np.arange(3)) == [0, 1, 2] and files.to_builtin(np.int8(4)) == 4
  with pytest.raises(TypeError, match=r"cannot write object <object object at .*> as JSON"):
    files.to_builtin(object())

# ---------------------------------------------------------------- The work directory


def test_make_workdir_creates_parents_and_names_what_is_in_the_way(tmp_path):
  assert files.make_workdir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
  assert (tmp_path / "a" / "b").is_dir()
  assert files.make_workdir(tmp_path / "a" / "b") == tmp_path / "a" / "b"  # Exists: fine.
  (tmp_path / "file").write_text("")
  with pytest.raises(files.WorkdirError, match=f"^--workdir {tmp_path}/file cannot be used: it "
                     r"is not a directory\. Pass a directory on writable storage"):
    files.make_workdir(tmp_path / "file")


def test_write_errors_become_one_output_write_error(tmp_path):
  with pytest.raises(files.OutputWriteError) as e:
    with files.write_errors_reported("writing the outputs to", tmp_path):
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.png"))
  assert str(e.value) == (f"writing the outputs to {tmp_path}/x.png failed: No space left on "
                          "device. The last checkpoint is kept: fix the cause and rerun the "
                          "same command.")
  with pytest.raises(ValueError, match="not an OSError"):  # Other errors pass unchanged.
    with files.write_errors_reported("writing", tmp_path):
      raise ValueError("not an OSError")
