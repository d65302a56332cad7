"""Temperature scaling: one temperature ``T`` fitted on the validation split, the logits divided
by it, so that a predicted probability of 0.8 is right about 80% of the time.

``T`` is recorded in ``summary.json`` beside the trained variables (which stay as trained)
and folded into the head (its dense kernel and bias divided by ``T``) of the model that the
run evaluates and exports and that ``predict`` loads, so they all compute the calibrated
probabilities with no extra operation. Everything else here is NumPy on the host, in float64, from class probabilities
(their logarithms are the logits less a per-example constant, which softmax ignores).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

BINS = 15                          # Equal-width confidence bins of the calibration error.
INVERSE_TEMPERATURE_RANGE = (0.05, 20.0)  # Where the fit searches 1/T.
SEARCH_STEPS = 60                  # Golden-section steps: the range shrinks to ~1e-12 of itself.


def with_temperature(probabilities, temperature: float) -> np.ndarray:
  """``softmax(log(probabilities) / temperature)``, float64 [N, classes].

  >>> with_temperature([[0.2, 0.8]], 1.0).round(3).tolist()
  [[0.2, 0.8]]
  >>> with_temperature([[0.2, 0.8]], 2.0).round(3).tolist()
  [[0.333, 0.667]]
  """
  logits = np.log(np.maximum(np.asarray(probabilities, np.float64), np.finfo(np.float32).tiny))
  scaled = logits / temperature
  scaled -= scaled.max(axis=1, keepdims=True)
  exp = np.exp(scaled)
  return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities, labels) -> float:
  """Mean ``-log p(true class)`` (the cross-entropy the model was trained on)."""
  probabilities = np.asarray(probabilities, np.float64)
  true = probabilities[np.arange(len(labels)), np.asarray(labels)]
  return float(-np.mean(np.log(np.maximum(true, np.finfo(np.float32).tiny))))


def fit_temperature(probabilities, labels) -> float:
  """The temperature that minimises the negative log-likelihood of ``labels`` under
  ``with_temperature(probabilities, T)``.

  The likelihood is concave in ``1/T`` (the logits scale linearly, and cross-entropy is
  convex in the logits), so a golden-section search over ``1/T`` in
  :data:`INVERSE_TEMPERATURE_RANGE` finds the optimum, or the bound nearest it.
  """
  labels = np.asarray(labels)
  if not len(labels):
    raise ValueError("a temperature needs at least one validation example; got none.")

  def loss(inverse: float) -> float:
    return negative_log_likelihood(with_temperature(probabilities, 1.0 / inverse), labels)

  low, high = INVERSE_TEMPERATURE_RANGE
  ratio = (np.sqrt(5.0) - 1.0) / 2.0
  a, b = high - ratio * (high - low), low + ratio * (high - low)
  loss_a, loss_b = loss(a), loss(b)
  for _ in range(SEARCH_STEPS):
    if loss_a <= loss_b:
      high, b, loss_b = b, a, loss_a
      a = high - ratio * (high - low)
      loss_a = loss(a)
    else:
      low, a, loss_a = a, b, loss_b
      b = low + ratio * (high - low)
      loss_b = loss(b)
  return float(2.0 / (low + high))


def reliability_bins(probabilities, labels, bins: int = BINS) -> dict[str, np.ndarray]:
  """Per equal-width confidence bin: its example count, mean confidence (of the predicted
  class) and accuracy (0 where the bin is empty)."""
  probabilities = np.asarray(probabilities, np.float64)
  confidence = probabilities.max(axis=1)
  correct = probabilities.argmax(axis=1) == np.asarray(labels)
  # Bin b holds confidences in (b/bins, (b+1)/bins]; the lowest bin also holds 0.
  index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
  count = np.bincount(index, minlength=bins)
  sums = [np.bincount(index, weights=w, minlength=bins) for w in (confidence, correct)]
  mean_confidence, accuracy = (np.divide(s, count, out=np.zeros(bins), where=count > 0)
                               for s in sums)
  return {"count": count, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(probabilities, labels, bins: int = BINS) -> float:
  """Expected calibration error: the example-weighted mean over ``bins`` equal-width
  confidence bins of |accuracy - mean confidence|.

  >>> round(expected_calibration_error([[0.9, 0.1], [0.6, 0.4]], [0, 1], bins=10), 6)
  0.35
  """
  table = reliability_bins(probabilities, labels, bins)
  gaps = np.abs(table["accuracy"] - table["confidence"])
  return float(np.sum(table["count"] * gaps) / max(1, table["count"].sum()))


def head_layer(layers: Sequence[Any]) -> str:
  """The name of the model's last dense layer, whose output is the logits."""
  dense = [layer.name for layer in layers if layer.kind == "dense"]
  if not dense:
    raise ValueError("the model has no dense head to fold a temperature into.")
  return dense[-1]


def calibrated_variables(model, variables: dict[str, Any], temperature: float) -> dict[str, Any]:
  """``variables`` with the head's kernel and bias divided by ``temperature``: the model's
  logits divided by it."""
  head = head_layer(model.layers)
  params = dict(variables["params"])
  params[head] = {name: value / temperature for name, value in params[head].items()}
  return {**variables, "params": params}


def recorded_temperature(run_summary: dict[str, Any]) -> float | None:
  """The temperature a run's ``summary.json`` records (None: none, or a run from before
  calibration)."""
  return (run_summary.get("calibration") or {}).get("temperature")


def summary(temperature: float | None, validation_before, validation_labels, test_after,
            test_labels, bins: int = BINS) -> dict[str, Any]:
  """What ``summary.json`` records: the temperature (None: not fitted, 1 applied), the
  validation NLL before and after it, and the test NLL and calibration error before and after
  (``test_after``: the calibrated model's test probabilities)."""
  applied = temperature or 1.0
  test_before = with_temperature(test_after, 1.0 / applied)
  record = {"temperature": temperature, "bins": bins,
            "test_ece_before": expected_calibration_error(test_before, test_labels, bins),
            "test_ece_after": expected_calibration_error(test_after, test_labels, bins),
            "test_nll_before": negative_log_likelihood(test_before, test_labels),
            "test_nll_after": negative_log_likelihood(test_after, test_labels)}
  if temperature is not None:
    record.update(
        validation_nll_before=negative_log_likelihood(validation_before, validation_labels),
        validation_nll_after=negative_log_likelihood(
            with_temperature(validation_before, temperature), validation_labels))
  return record


def diagram_curves(record: dict[str, Any], test_after) -> dict[str, np.ndarray]:
  """The reliability diagram's curves from a ``summary`` record: the test probabilities
  before and after the temperature, or the one curve where none was fitted."""
  temperature = record["temperature"]
  if temperature is None:
    return {"not calibrated": np.asarray(test_after)}
  return {"before (T = 1)": with_temperature(test_after, 1.0 / temperature),
          f"after (T = {temperature:.3f})": np.asarray(test_after)}
