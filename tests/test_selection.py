"""Best-epoch selection and early stopping: the tracker, and runs with a scripted validation
metric (a crash in between, then a rerun that finds the run finished)."""

import json

import flax.serialization
import jax
import numpy as np
import pytest

from configs import default
from helpers import tiny_config
from tljax import dispatch, selection, train

VALIDATION_EXAMPLES = 32  # 20% of tiny_idx_dir's 160 training images; the test split has 40.


def test_tracker_keeps_the_best_and_counts_epochs_since():
  tracker = selection.Tracker("val_accuracy")
  improved = [tracker.update(epoch, value, step=epoch * 10)
              for epoch, value in enumerate([0.5, 0.9, 0.9, float("nan"), 0.7], start=1)]
  assert improved == [True, True, False, False, False]  # A tie or NaN is no improvement.
  assert (tracker.best_epoch, tracker.best_step, tracker.best_value) == (2, 20, 0.9)
  assert tracker.epochs_without_improvement == 3
  assert tracker.should_stop(3) and not tracker.should_stop(4) and not tracker.should_stop(0)
  again = selection.Tracker.from_meta(tracker.to_meta(1), 1, "val_accuracy")
  assert again == tracker
  assert selection.Tracker.from_meta(tracker.to_meta(1), 2, "val_loss") == \
      selection.Tracker("val_loss")


@pytest.mark.parametrize("overrides, match", [
    ({"select": "first"}, r"select='first' is not one of \('last', 'best'\)"),
    ({"select_metric": "accuracy"}, r"select_metric='accuracy' is not one of"),
    ({"early_stopping_patience": -1}, "early_stopping_patience=-1 must be >= 0"),
])
def test_bad_settings_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    selection.check(default.phase(**overrides), True, "phases[0]")


def test_best_without_validation_is_refused():
  with pytest.raises(ValueError, match="data.validation_split is 0; set it above 0"):
    selection.check(default.phase(select="best"), False, "phases[0]")


def head_config(data_dir):
  config = tiny_config(data_dir)
  config.phases = (default.phase(name="head", epochs=5, rules=("train:predictions/.*",
                                                               "freeze:.*"),
                                 select="best", early_stopping_patience=2),)
  config.calibrate = False  # Validation is scripted epoch by epoch; no temperature after.
  return config


def script_validation(monkeypatch, accuracies, seen):
  """Validation reports ``accuracies`` in turn (and records the variables it evaluated);
  when they run out, the run crashes."""
  original = dispatch.evaluate_split

  def evaluate_split(eval_batch, variables, source, batch_size):
    out = original(eval_batch, variables, source, batch_size)
    if len(source) != VALIDATION_EXAMPLES:
      return out
    if not accuracies:
      raise KeyboardInterrupt("simulated crash in validation")
    seen.append(jax.device_get(variables))
    return (out[0], accuracies.pop(0), *out[2:])

  monkeypatch.setattr(dispatch, "evaluate_split", evaluate_split)


@pytest.fixture(scope="module")
def stopped_run(tiny_idx_dir, tmp_path_factory):
  """val_accuracy 0.5, 0.9, 0.6, then a crash in epoch 4's validation; the rerun reports 0.4
  for epoch 4: two epochs without improving on epoch 2, so the phase stops after epoch 4."""
  workdir = tmp_path_factory.mktemp("stopped")
  seen = []
  with pytest.MonkeyPatch.context() as monkeypatch:
    script_validation(monkeypatch, [0.5, 0.9, 0.6], seen)
    with pytest.raises(KeyboardInterrupt):
      train.run(head_config(tiny_idx_dir), workdir)
    monkeypatch.undo()
    script_validation(monkeypatch, [0.4], seen)
    summary = train.run(head_config(tiny_idx_dir), workdir)
  return workdir, summary, seen


def test_best_epoch_is_selected_across_a_restart(stopped_run):
  workdir, summary, seen = stopped_run
  assert len(seen) == 4
  trained = flax.serialization.msgpack_restore(
      (workdir / "trained_variables.msgpack").read_bytes())
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(seen[1])):
    np.testing.assert_array_equal(a, b)
  last = seen[3]["params"]["predictions"]["kernel"]
  assert not np.array_equal(trained["params"]["predictions"]["kernel"], last)
  assert summary["weights_from"] == {
      "phase": "head", "epoch": 2, "step": 16, "select": "best", "ema": False,
      "metric": "val_accuracy", "value": 0.9}
  saved = json.loads((workdir / "summary.json").read_text())
  assert saved["weights_from"]["epoch"] == 2


def test_early_stopping_stops_and_a_rerun_finds_the_run_finished(stopped_run, tiny_idx_dir,
                                                                monkeypatch):
  workdir, summary, _ = stopped_run
  assert summary["phases"][0]["stopped_early_after_epoch"] == 4
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3, 4]
  monkeypatch.setattr(train, "train_phase", lambda *a: pytest.fail("trained again"))
  again = train.run(head_config(tiny_idx_dir), workdir)
  assert again["weights_from"] == summary["weights_from"]
  assert again["test_accuracy"] == summary["test_accuracy"]


def test_class_scores_weigh_every_class_alike():
  # Class 0: 6 of 8 right; class 1: 1 of 2 (predicted 3 times); class 2: never predicted.
  labels = np.array([0] * 8 + [1] * 2 + [2] * 2)
  predictions = np.array([0] * 6 + [1] * 2 + [1, 0] + [0, 0])
  scores = selection.class_scores(labels, predictions, 3)
  assert scores["val_balanced_accuracy"] == pytest.approx((6 / 8 + 1 / 2 + 0) / 3)
  f1 = [2 * (6 / 9) * (6 / 8) / (6 / 9 + 6 / 8), 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 0]
  assert scores["val_macro_f1"] == pytest.approx(np.mean(f1))
  for metric in selection.CLASS_SCORES:  # Both can select the best epoch (higher is better).
    selection.check(default.phase(select="best", select_metric=metric), True, "phases[0]")
    tracker = selection.Tracker(metric)
    assert [tracker.update(e, v, step=e) for e, v in [(1, 0.5), (2, 0.7), (3, 0.6)]] == \
        [True, True, False]
