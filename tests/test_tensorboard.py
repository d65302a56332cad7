"""tljax.tensorboard: the event files hold every scalar metrics.jsonl holds, at its step, and
the test confusion matrix; disabled, nothing is written."""

import numpy as np
import pytest

from helpers import read_events, read_records
from tljax import tensorboard


def test_tensorboard_events_hold_the_logged_scalars(tiny_idx_run):
  workdir, _ = tiny_idx_run
  scalars, images = read_events(workdir)
  records = read_records(workdir)
  dispatches = [r for r in records if r["kind"] == "step"]
  epochs = [r for r in records if r["kind"] == "epoch"]
  for key in ("loss", "accuracy", "learning_rate", "images_per_s"):
    assert scalars[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6))
                                       for r in dispatches], key
  assert {r["learning_rate"] for r in dispatches} == {1e-3}
  assert scalars["validation/accuracy"] == [(r["step"], pytest.approx(r["val_accuracy"]))
                                            for r in epochs]
  assert [step for step, _ in scalars["epoch/loss"]] == [r["step"] for r in epochs]
  assert images == {"test/confusion_matrix"}


def test_records_become_scalars_under_their_kind(tmp_path):
  with tensorboard.EventWriter(tmp_path) as events:
    events.write({"kind": "step", "step": 3, "loss": np.float32(0.5), "accuracy": 0.25,
                  "learning_rate": 1e-3, "images_per_s": None, "skipped_steps": 1,
                  "val_loss": 9.0})  # Not a step's key: left out.
    events.write({"kind": "epoch", "step": 4, "loss": 0.75, "accuracy": 0.5,
                  "val_loss": 0.625, "val_accuracy": None, "phase": 0})
  scalars, images = read_events(tmp_path)
  assert scalars == {"train/loss": [(3, 0.5)], "train/accuracy": [(3, 0.25)],
                     "train/learning_rate": [(3, pytest.approx(1e-3))],
                     "train/skipped_steps": [(3, 1.0)], "epoch/loss": [(4, 0.75)],
                     "epoch/accuracy": [(4, 0.5)], "validation/loss": [(4, 0.625)]}
  assert images == set()


def test_images_are_added_and_a_disabled_writer_writes_nothing(tmp_path):
  import matplotlib.pyplot as plt
  png = tmp_path / "plot.png"
  plt.imsave(png, np.zeros((4, 6, 3)))
  with tensorboard.EventWriter(tmp_path / "on") as events:
    events.add_image("test/confusion_matrix", png, 7)
  assert read_events(tmp_path / "on") == ({}, {"test/confusion_matrix"})
  with tensorboard.EventWriter(tmp_path / "off", enabled=False) as events:
    events.write({"kind": "step", "step": 1, "loss": 1.0})
    events.add_image("test/confusion_matrix", png, 1)
  assert not (tmp_path / "off").exists()
