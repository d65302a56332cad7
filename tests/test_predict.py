"""tljax.predict: a finished run's predictions on files, folders, globs and IDX files equal the
run's own, with the run's preprocessing; bad input is one message and exit 2."""

import csv
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, logged_error, make_folder
from tljax import export, predict


@pytest.fixture
def idx_run(tiny_idx_run):
  return tiny_idx_run[0]


@pytest.fixture
def folder_run(tiny_folder_run):
  return tiny_folder_run[:2]


def test_idx_file_predictions_are_the_runs_own(idx_run, tiny_idx_dir):
  run = predict.load_run(idx_run)
  images_file = tiny_idx_dir / "t10k-images-idx3-ubyte.gz"
  rows = predict.predict(run, predict.read_inputs(predict.expand_paths([str(images_file)]),
                                                  run.image_shape), batch_size=16, top_k=3)
  saved = np.load(idx_run / "test_predictions.npz")
  assert [r["path"] for r in rows] == [f"{images_file}#{i}" for i in range(40)]
  assert [r["label"] for r in rows] == [run.class_names[p] for p in saved["predictions"]]
  probabilities = [r["probability"] for r in rows]
  np.testing.assert_allclose(probabilities, saved["probabilities"].max(1), rtol=0, atol=1e-5)
  assert all(len(r["top_k"]) == 3 and r["top_k"][0] == [r["label"], r["probability"]]
             for r in rows)


def test_image_files_of_a_folder_run_get_the_runs_predictions(folder_run, tmp_path):
  root, workdir = folder_run
  test_files = (workdir / "splits" / "test.txt").read_text().split()
  run = predict.load_run(workdir)
  assert run.image_shape == (40, 40, 3)  # The stored size for input 32.
  rows = predict.predict(run, predict.read_inputs([root / f for f in test_files],
                                                  run.image_shape), batch_size=4)
  saved = np.load(workdir / "test_predictions.npz")
  assert [r["label"] for r in rows] == [run.class_names[p] for p in saved["predictions"]]
  np.testing.assert_allclose([r["probability"] for r in rows], saved["probabilities"].max(1),
                             rtol=0, atol=1e-5)
  # The command: a folder and a glob, written as CSV and JSON.
  for output in (tmp_path / "out.csv", tmp_path / "out.json"):
    assert predict.run(str(workdir), [str(root / "red"), str(root / "blue" / "00[0-7].jpg")],
                       output=str(output), top_k=2, batch_size=64, write_export=False) == 0
  with open(tmp_path / "out.csv", newline="") as f:
    assert next(csv.reader(f)) == ["path", "label", "probability", "top_k"]
  with open(tmp_path / "out.csv", newline="") as f:
    written = list(csv.DictReader(f))
  assert len(written) == 12 + 8 and written[0]["path"] == str(root / "red" / "000.jpg")
  as_json = json.loads((tmp_path / "out.json").read_text())
  assert len(as_json) == 12 + 8
  assert all(list(r) == ["path", "label", "probability", "top_k"] for r in as_json)
  assert [r["path"] for r in written] == [r["path"] for r in as_json]
  assert json.loads(written[0]["top_k"]) == as_json[0]["top_k"]
  assert all(len(r["top_k"]) == 2 and r["top_k"][0] == [r["label"], r["probability"]]
             for r in as_json)


def test_export_flag_writes_the_export_directory_then_predicts(idx_run, tiny_idx_dir, tmp_path):
  workdir = tmp_path / "run"  # What prediction reads of the run, and no export/ yet.
  workdir.mkdir()
  for name in ("summary.json", "trained_variables.msgpack"):
    shutil.copy(idx_run / name, workdir / name)
  assert predict.run(str(workdir), [], output=None, top_k=3, batch_size=8,
                     write_export=True) == 0  # Export only: no images needed.
  assert sorted(p.name for p in (workdir / "export").iterdir()) == [export.ARTIFACT,
                                                                  export.METADATA]
  assert all((workdir / "export" / name).stat().st_size > 0
             for name in (export.ARTIFACT, export.METADATA))
  # The same model as the run's own export: the same contract, the same probabilities (the
  # artifact's size may differ by the source locations jax.export records).
  ours, runs = (json.loads((w / "export" / export.METADATA).read_text())
                for w in (workdir, idx_run))
  assert ({k: v for k, v in ours.items() if k != "files"}
          == {k: v for k, v in runs.items() if k != "files"})
  assert ours["files"].keys() == runs["files"].keys() == {export.ARTIFACT}
  images_file = tiny_idx_dir / "t10k-images-idx3-ubyte.gz"
  images = np.stack([image for _, image in predict.read_inputs([images_file], (28, 28))][:5])
  np.testing.assert_allclose(export.predict(workdir / "export", images),
                             export.predict(idx_run / "export", images), rtol=0, atol=1e-6)
  # Export and predictions in one command: the rows are written as well.
  shutil.rmtree(workdir / "export")
  assert predict.run(str(workdir), [str(images_file)], output=str(tmp_path / "out.json"),
                     top_k=10, batch_size=64, write_export=True) == 0
  assert (workdir / "export" / export.ARTIFACT).stat().st_size > 0
  rows = json.loads((tmp_path / "out.json").read_text())[:5]
  class_names = json.loads((workdir / "export" / export.METADATA).read_text())["class_names"]
  predicted = np.zeros((5, len(class_names)))
  for i, row in enumerate(rows):
    for label, probability in row["top_k"]:
      predicted[i, class_names.index(label)] = probability
  np.testing.assert_allclose(export.predict(workdir / "export", images), predicted,
                             rtol=0, atol=1e-5)


def test_expand_paths_skips_hidden_and_other_files(tmp_path):
  make_folder(tmp_path / "in", {"a": 2}, ext="png")
  (tmp_path / "in" / "a" / "notes.txt").write_text("not an image")
  (tmp_path / "in" / ".hidden").mkdir()
  (tmp_path / "in" / ".hidden" / "x.png").write_bytes(b"")
  assert predict.expand_paths([str(tmp_path / "in"), str(tmp_path / "in" / "a" / "000.png")]) \
      == [tmp_path / "in" / "a" / "000.png", tmp_path / "in" / "a" / "001.png"]


@pytest.mark.parametrize("case, message", [
    ("no_workdir", "is not a directory; pass the work directory of a finished run"),
    ("unfinished", "holds no finished run (no summary.json or trained_variables.msgpack): "
                   "rerun its training command"),
    ("bad_image", "broken.jpg: not an image Pillow can identify"),
    ("no_match", "no image files at"),
    ("bad_output", "out.xlsx: name a .csv or .json file."),
    ("output_folder_missing", "absent/out.csv: the folder "),
])
def test_bad_input_is_one_message_and_exit_2(case, message, folder_run, tmp_path, caplog,
                                            monkeypatch):
  root, workdir = folder_run
  paths, output = [str(root / "red" / "000.jpg")], None
  if case == "no_workdir":
    workdir = tmp_path / "absent"
  elif case == "unfinished":
    workdir = tmp_path / "started"
    workdir.mkdir()
  elif case == "bad_image":
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    paths = [str(tmp_path / "broken.jpg")]
  elif case == "no_match":
    paths = [str(tmp_path / "*.png")]
  else:  # Refused before anything is predicted.
    output = str(tmp_path / ("out.xlsx" if case == "bad_output" else "absent/out.csv"))
    monkeypatch.setattr(predict, "predict", lambda *a, **k: pytest.fail("predicted first"))
  with caplog.at_level(logging.ERROR):
    assert predict.run(str(workdir), paths, output=output, top_k=3, batch_size=8,
                       write_export=False) == 2
  record = logged_error(caplog)
  assert message in record.getMessage() and not record.exc_info
  if case == "bad_image":  # Said once.
    assert record.getMessage().endswith("; remove it from the paths, or replace it.")
    assert record.getMessage().lower().count("replace") == 1


def test_command_line_exit_code(tmp_path):
  done = subprocess.run([sys.executable, "-m", "tljax.predict", f"--workdir={tmp_path}",
                         str(tmp_path / "x.jpg")], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 2, done.stderr[-2000:]
  assert "holds no finished run" in done.stderr and "Traceback" not in done.stderr
