"""tljax.calibration: the temperature fitted on validation minimises its NLL, the expected
calibration error is the binned gap, the temperature folded into the head divides the logits,
and a run records it, applies it to its test predictions and hands it to predict and the
export (conftest's tiny_idx_run)."""

import json

import numpy as np
import pytest

from helpers import MODEL, read_variables
from tljax import calibration, predict


def _overconfident(n=400, classes=5, seed=0):
  """Probabilities of a model right 70% of the time but about 95% sure: softmax of sharp
  logits (a scale of 6) that favour a wrong class in 30% of the examples."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  favoured = np.where(rng.uniform(size=n) < 0.7, labels, (labels + 1) % classes)
  logits = rng.normal(size=(n, classes)) + 6.0 * np.eye(classes)[favoured]
  exp = np.exp(logits - logits.max(1, keepdims=True))
  return (exp / exp.sum(1, keepdims=True)).astype(np.float32), labels


def test_fitted_temperature_minimises_the_validation_nll():
  probabilities, labels = _overconfident()
  temperature = calibration.fit_temperature(probabilities, labels)
  grid = np.linspace(0.5, 5.0, 451)  # Every 0.01.
  nll = [calibration.negative_log_likelihood(calibration.with_temperature(probabilities, t),
                                             labels) for t in grid]
  assert temperature == pytest.approx(grid[int(np.argmin(nll))], abs=0.01)
  assert temperature > 1.5  # Overconfident: the logits are divided down.
  before = calibration.negative_log_likelihood(probabilities, labels)
  after = calibration.negative_log_likelihood(
      calibration.with_temperature(probabilities, temperature), labels)
  assert after < before - 0.1
  assert (calibration.expected_calibration_error(
      calibration.with_temperature(probabilities, temperature), labels)
          < calibration.expected_calibration_error(probabilities, labels) / 2)


def test_expected_calibration_error_is_the_example_weighted_gap_per_bin():
  # Confidences 0.96 and 0.94 (bin 14 of 15, above 14/15: one right, mean 0.95, accuracy
  # 0.5), 0.5 (bin 7: right), 0.38 (bin 5: wrong).
  probabilities = [[0.96, 0.04, 0.0], [0.03, 0.94, 0.03], [0.5, 0.3, 0.2], [0.31, 0.31, 0.38]]
  labels = [0, 0, 0, 1]
  expected = (2 * abs(0.5 - 0.95) + abs(1 - 0.5) + abs(0 - 0.38)) / 4
  assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(expected)
  table = calibration.reliability_bins(probabilities, labels)
  assert table["count"].tolist() == [0] * 5 + [1, 0, 1] + [0] * 6 + [2]


def test_a_temperature_folded_into_the_head_divides_the_logits():
  head = [layer.name for layer in MODEL.layers].index("predictions")
  features = np.random.default_rng(1).normal(size=(4, 1280)).astype(np.float32)
  rng = np.random.default_rng(2)
  variables = {"params": {"predictions": {"kernel": rng.normal(size=(1280, 10)) / 30,
                                          "bias": rng.normal(size=10)},
                          "Conv1": {"kernel": np.ones((3, 3, 3, 16))}}, "batch_stats": {}}
  logits = np.asarray(MODEL.apply(variables, {"global_average_pooling2d": features},
                                  start=head))
  folded = calibration.calibrated_variables(MODEL, variables, 2.5)
  np.testing.assert_allclose(
      MODEL.apply(folded, {"global_average_pooling2d": features}, start=head), logits / 2.5,
      rtol=1e-5, atol=1e-6)
  assert folded["params"]["Conv1"] is variables["params"]["Conv1"]  # The rest as it was.


def test_a_run_records_its_temperature_and_predict_and_export_apply_it(tiny_idx_run):
  workdir, summary = tiny_idx_run
  record = summary["calibration"]
  temperature = record["temperature"]
  assert 0.05 <= temperature <= 20 and temperature != 1.0
  assert record["validation_nll_after"] < record["validation_nll_before"]
  assert record["bins"] == 15
  # Test probabilities are the calibrated model's: undoing T gives back the recorded "before".
  test = np.load(workdir / "test_predictions.npz")
  before = calibration.with_temperature(test["probabilities"], 1 / temperature)
  assert calibration.expected_calibration_error(before, test["labels"]) == pytest.approx(
      record["test_ece_before"], abs=1e-6)
  assert calibration.expected_calibration_error(test["probabilities"], test["labels"]) == \
      pytest.approx(record["test_ece_after"], abs=1e-9)
  model_json = json.loads((workdir / "export" / "model.json").read_text())
  assert model_json["calibration"]["temperature"] == temperature
  # The saved variables stay as trained; predict folds the recorded temperature into them.
  run = predict.load_run(workdir)
  trained = read_variables(workdir)["params"]["predictions"]
  assert run.temperature == temperature
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(run.variables["params"]["predictions"][name],
                               trained[name] / temperature, rtol=1e-6)
