"""Tests of tljax.evaluate."""

import numpy as np
import pytest

from tljax import evaluate

LABELS = [0, 0, 1, 2, 2, 2]
PREDICTIONS = [0, 1, 1, 2, 0, 2]


def test_confusion_matrix_counts_pairs():
  cm = evaluate.confusion_matrix(LABELS, PREDICTIONS, num_classes=3)
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
  assert cm.dtype == np.int64


def test_confusion_matrix_keeps_unseen_classes():
  cm = evaluate.confusion_matrix(np.array([1, 1], np.uint8), np.array([1, 0], np.int32), 4)
  np.testing.assert_array_equal(cm, [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_confusion_matrix_of_no_examples_is_zero():
  np.testing.assert_array_equal(evaluate.confusion_matrix([], [], 2), np.zeros((2, 2)))


@pytest.mark.parametrize("labels, predictions, num_classes, error, match", [
    ([0, 1], [0], 2, ValueError, "same length, got 2 labels and 1 predictions"),
    ([0, 3], [0, 1], 3, ValueError, r"labels must lie in \[0, 3\), found 3"),
    ([0, -1], [0, 1], 3, ValueError, r"labels must lie in \[0, 3\), found -1"),
    ([0, 1], [0, 5], 3, ValueError, r"predictions must lie in \[0, 3\), found 5"),
    ([[0, 1]], [[0, 1]], 3, ValueError, r"labels must be a 1-D array.*\(1, 2\)"),
    ([0.0, 1.0], [0, 1], 3, TypeError, "integer class ids, got dtype float64; take the argmax"),
    ([0], [0], 0, ValueError, "num_classes must be >= 1, got 0"),
    ([0], [0], 2.0, TypeError, "num_classes must be an int, got 2.0"),
])
def test_confusion_matrix_rejects_bad_input(labels, predictions, num_classes, error, match):
  with pytest.raises(error, match=match):
    evaluate.confusion_matrix(labels, predictions, num_classes)


def _predictions_with_errors(n: int, wrong: int, num_classes: int = 10):
  labels = np.arange(n) % num_classes
  predictions = labels.copy()
  predictions[np.linspace(0, n - 1, wrong).astype(int)] += 1
  return labels, predictions % num_classes


def test_pick_samples_is_deterministic_and_depends_on_seed():
  labels, predictions = _predictions_with_errors(1000, 100)
  first = evaluate.pick_samples(labels, predictions, n=9, seed=0)
  np.testing.assert_array_equal(first, evaluate.pick_samples(labels, predictions, n=9, seed=0))
  assert not np.array_equal(first, evaluate.pick_samples(labels, predictions, n=9, seed=1))
  assert first.dtype == np.int64
  np.testing.assert_array_equal(first, np.unique(first))  # sorted, no repeats


@pytest.mark.parametrize("n_examples, n_wrong, n, expected_wrong", [
    (1000, 100, 9, 3),  # a third of the grid shows errors
    (1000, 1, 9, 1),    # the only error is shown
    (1000, 0, 9, 0),
    (20, 18, 9, 7),     # only 2 right: the rest are errors
    (20, 20, 9, 9),
    (5, 2, 9, 2),       # fewer examples than asked: all of them
])
def test_pick_samples_includes_errors(n_examples, n_wrong, n, expected_wrong):
  labels, predictions = _predictions_with_errors(n_examples, n_wrong)
  assert (labels != predictions).sum() == n_wrong
  picked = evaluate.pick_samples(labels, predictions, n=n)
  assert len(picked) == min(n, n_examples)
  assert (labels[picked] != predictions[picked]).sum() == expected_wrong


def test_pick_samples_rejects_bad_input():
  with pytest.raises(ValueError, match="n must be >= 1, got 0"):
    evaluate.pick_samples([0, 1], [0, 1], n=0)
  with pytest.raises(ValueError, match="same length"):
    evaluate.pick_samples([0, 1], [0], n=1)


def test_classification_report_matches_hand_computed_counts():
  # cm = [[1, 1, 0], [0, 1, 0], [1, 0, 2]] (rows true, columns predicted), plus class 3 that
  # is neither present nor predicted.
  cm = evaluate.confusion_matrix(LABELS, PREDICTIONS, num_classes=4)
  report = evaluate.classification_report(cm, ["a", "b", "c", "d"])
  rows = [(c["name"], c["precision"], c["recall"], c["f1"], c["support"])
          for c in report["classes"]]
  assert rows == [("a", 0.5, 0.5, 0.5, 2), ("b", 0.5, 1.0, pytest.approx(2 / 3), 1),
                  ("c", 1.0, pytest.approx(2 / 3), pytest.approx(0.8), 3),
                  ("d", 0.0, 0.0, 0.0, 0)]
  assert report["macro_avg"] == {"precision": pytest.approx(2 / 4),
                                 "recall": pytest.approx((0.5 + 1 + 2 / 3) / 4),
                                 "f1": pytest.approx((0.5 + 2 / 3 + 0.8) / 4), "support": 6}
  assert report["weighted_avg"] == {"precision": pytest.approx(4.5 / 6),
                                    "recall": pytest.approx(4 / 6),
                                    "f1": pytest.approx((1 + 2 / 3 + 2.4) / 6),
                                    "support": 6}
  assert report["accuracy"] == pytest.approx(4 / 6)
  assert "top5_accuracy" not in report  # Only 4 classes.
  table = evaluate.format_classification_report(report)
  assert table.splitlines()[1].split() == ["a", "0.5000", "0.5000", "0.5000", "2"]
  assert "weighted avg" in table and "0.6667" in table.splitlines()[-1]


def test_classification_report_top5_accuracy_from_probabilities():
  labels = [0, 1, 2]
  probabilities = np.full((3, 7), 0.1)
  probabilities[0, 0] = 0.4          # Most probable: a hit.
  probabilities[1, 2:6] = 0.2        # Four classes above the true one, fifth: a hit.
  probabilities[2, [0, 1, 3, 4, 5]] = 0.15  # Five classes above: a miss.
  predictions = np.argmax(probabilities, axis=1)
  cm = evaluate.confusion_matrix(labels, predictions, num_classes=7)
  report = evaluate.classification_report(cm, list("abcdefg"), labels=labels,
                                          probabilities=probabilities)
  assert report["top5_accuracy"] == pytest.approx(2 / 3)
  assert "top5 accuracy" in evaluate.format_classification_report(report)
  with pytest.raises(ValueError, match=r"probabilities must be \[N, classes\] with N=2"):
    evaluate.top_k_accuracy([0, 1], probabilities, k=5)
  with pytest.raises(ValueError, match="3 class names for a 7-class"):
    evaluate.classification_report(cm, ["a", "b", "c"])


def test_top_losses_rank_by_the_true_class_probability():
  probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5], [0.05, 0.95]])
  labels = [0, 0, 1, 1, 0]  # True-class probabilities 0.9, 0.2, 0.4, 0.5, 0.05.
  assert evaluate.top_losses(labels, probabilities, 3).tolist() == [4, 1, 2]
  assert evaluate.top_losses(labels, probabilities, 9).tolist() == [4, 1, 2, 3, 0]
  with pytest.raises(ValueError, match=r"probabilities must be \[N, classes\] with N=4"):
    evaluate.top_losses(labels[:4], probabilities, 3)


def test_balanced_accuracy_is_the_mean_recall_of_the_classes_present():
  # Recalls 3/4 and 2/2; class c has no examples and is left out (predicted once).
  cm = np.array([[3, 0, 1], [0, 2, 0], [0, 0, 0]])
  report = evaluate.classification_report(cm, ["a", "b", "c"])
  assert evaluate.balanced_accuracy(report) == pytest.approx((3 / 4 + 1) / 2)
  assert report["accuracy"] == pytest.approx(5 / 6)
