"""Tests of tljax.reporting: metrics.jsonl and progress reporting."""

import io
import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tljax import files, reporting

# ---------------------------------------------------------------- MetricsWriter


def test_metrics_writer_round_trips_numpy_and_jax_values(tmp_path):
  path = tmp_path / "run" / "metrics.jsonl"  # the directory is created
  record = {"phase": np.int64(0), "phase_name": "frozen_base", "epoch": 1,
            "loss": np.float32(0.25), "accuracy": jnp.asarray(0.75),
            "val_loss": None, "per_class": np.array([0.5, 1.0])}
  with reporting.MetricsWriter(path) as writer:
    writer.write(record)
    writer.write({"phase": 0, "epoch": 2, "loss": np.float64(0.125)})
  lines = path.read_text().splitlines()
  assert len(lines) == 2
  first = json.loads(lines[0])
  assert first == {"phase": 0, "phase_name": "frozen_base", "epoch": 1, "loss": 0.25,
                   "accuracy": 0.75, "val_loss": None, "per_class": [0.5, 1.0]}
  assert type(first["phase"]) is int and type(first["loss"]) is float
  assert reporting.read_metrics(path) == [first, {"phase": 0, "epoch": 2, "loss": 0.125}]


def test_disabled_metrics_writer_checks_records_but_writes_nothing(tmp_path):
  path = tmp_path / "run" / "metrics.jsonl"
  with reporting.MetricsWriter(path, enabled=False) as writer:
    writer.write({"step": 1})
    with pytest.raises(TypeError, match="must be a mapping"):
      writer.write([("step", 2)])
  assert not path.parent.exists()


def test_metrics_writer_makes_each_record_durable_at_once(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = reporting.MetricsWriter(path)
  writer.write({"step": 1})
  assert reporting.read_metrics(path) == [{"step": 1}]  # before close
  writer.close()


def test_metrics_writer_appends_on_reopen(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with reporting.MetricsWriter(path) as writer:
    writer.write({"epoch": 1})
  with reporting.MetricsWriter(path) as writer:
    writer.write({"epoch": 2})
  assert reporting.read_metrics(path) == [{"epoch": 1}, {"epoch": 2}]


def test_metrics_writer_starts_a_new_line_after_a_partial_one(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"epoch": 1}\n{"epoch": 2, "lo')  # killed mid-write
  with reporting.MetricsWriter(path) as writer:
    writer.write({"epoch": 2})
  with caplog.at_level(logging.WARNING):
    assert reporting.read_metrics(path) == [{"epoch": 1}, {"epoch": 2}]
  assert "metrics.jsonl:2: skipping a line that is not JSON" in caplog.text


def test_a_full_disk_while_appending_metrics_names_the_file(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  with reporting.MetricsWriter(path) as writer:
    writer.write({"step": 1})

    def no_space(fd):
      raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(files.OutputWriteError) as e:
      writer.write({"step": 2})
  assert str(e.value) == (f"appending to {path} failed: No space left on device. The last "
                          "checkpoint is kept: fix the cause and rerun the same command.")


def test_metrics_writer_rejects_bad_records(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with reporting.MetricsWriter(path) as writer:
    with pytest.raises(TypeError, match="must be a mapping, got list"):
      writer.write([1, 2])
    with pytest.raises(TypeError, match="cannot write object"):
      writer.write({"epoch": 1, "bad": object()})
  assert path.read_text() == ""  # nothing half-written
  with pytest.raises(ValueError, match="is closed"):
    writer.write({"epoch": 1})


# ---------------------------------------------------------------- Progress


def _progress_messages(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.name == "tljax.reporting"]


def test_progress_plain_logs_every_interval_with_metrics(caplog):
  stream = io.StringIO()
  with caplog.at_level(logging.INFO, logger="tljax.reporting"):
    with reporting.Progress(4, "phase 0 epoch 1", stream=stream, interval_s=0.0,
                            batch_size=32, tty=False) as progress:
      progress.update(1, loss=np.float32(0.5), accuracy=0.75)
      progress.update(1, loss=0.25)
  messages = _progress_messages(caplog)
  assert len(messages) == 3  # two updates and the end
  assert messages[0].startswith("phase 0 epoch 1: step 1/4 (25%) loss=0.5 accuracy=0.75 "
                                "images/s=")
  assert messages[1].startswith("phase 0 epoch 1: step 2/4 (50%) loss=0.25 accuracy=0.75 ")
  assert "images/s=" in messages[2] and ", done in " in messages[2]
  assert stream.getvalue() == ""  # plain lines go to logging, not the stream


def test_progress_plain_logs_only_at_the_end_within_the_interval(caplog):
  with caplog.at_level(logging.INFO, logger="tljax.reporting"):
    progress = reporting.Progress(3, "eval", stream=io.StringIO(), interval_s=3600.0, tty=False)
    for _ in range(3):
      progress.update(1, accuracy=0.5)
    progress.close()
    progress.close()  # idempotent
  messages = _progress_messages(caplog)
  assert len(messages) == 1
  assert messages[0].startswith("eval: step 3/3 (100%) accuracy=0.5, done in ")
  assert "images/s" not in messages[0]  # no batch_size given


def test_progress_tty_draws_a_tqdm_bar_on_the_stream(caplog):
  stream = io.StringIO()
  with caplog.at_level(logging.INFO, logger="tljax.reporting"):
    with reporting.Progress(4, "phase 1 epoch 2", stream=stream, batch_size=8,
                            tty=True) as progress:
      for _ in range(4):
        progress.update(1, loss=0.125, accuracy=jnp.asarray(0.875))
  output = stream.getvalue()
  assert "phase 1 epoch 2: 100%" in output
  assert "4/4" in output
  assert "loss=0.125 accuracy=0.875 images/s=" in output
  assert _progress_messages(caplog) == []


def test_progress_detects_a_non_tty_stream(caplog):
  stream = io.StringIO()  # isatty() is False
  with caplog.at_level(logging.INFO, logger="tljax.reporting"):
    with reporting.Progress(1, "epoch", stream=stream) as progress:
      progress.update(1)
  assert stream.getvalue() == ""
  assert len(_progress_messages(caplog)) == 1


@pytest.mark.parametrize("tty", [True, False])
def test_progress_disabled_reports_nothing(caplog, tty):
  stream = io.StringIO()
  with caplog.at_level(logging.INFO, logger="tljax.reporting"):
    with reporting.Progress(2, "epoch", stream=stream, enabled=False, interval_s=0.0,
                            tty=tty) as progress:
      progress.update(2, loss=1.0)
  assert stream.getvalue() == ""
  assert _progress_messages(caplog) == []


def test_progress_rejects_negative_total():
  with pytest.raises(ValueError, match="total must be >= 0 steps, got -1"):
    reporting.Progress(-1, "epoch")
