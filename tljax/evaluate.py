"""Host-side evaluation: accuracy, confusion matrix, choice of samples to show.

All functions take integer class ids as NumPy-convertible 1-D arrays and are
pure; they never touch a device.
"""

from collections.abc import Sequence

import numpy as np


def _class_ids(name: str, values) -> np.ndarray:
  """Returns ``values`` as a 1-D int64 array, or raises naming ``name``."""
  array = np.asarray(values)
  if array.ndim != 1:
    raise ValueError(
        f"{name} must be a 1-D array of class ids, got shape {array.shape}.")
  if array.size and not np.issubdtype(array.dtype, np.integer):
    raise TypeError(
        f"{name} must hold integer class ids, got dtype {array.dtype}; "
        "take the argmax of the logits first.")
  return array.astype(np.int64)


def _paired(labels, predictions) -> tuple[np.ndarray, np.ndarray]:
  labels = _class_ids("labels", labels)
  predictions = _class_ids("predictions", predictions)
  if labels.shape != predictions.shape:
    raise ValueError(
        f"labels and predictions must have the same length, got "
        f"{labels.size} labels and {predictions.size} predictions.")
  return labels, predictions


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """Counts (true class, predicted class) pairs.

  >>> confusion_matrix([0, 1, 1], [0, 0, 1], num_classes=2)
  array([[1, 0],
         [1, 1]])

  Args:
    labels: true class ids, shape [N].
    predictions: predicted class ids, shape [N].
    num_classes: number of classes; every id must lie in [0, num_classes).

  Returns:
    int64 array [num_classes, num_classes]; rows are true classes, columns are
    predicted classes.
  """
  labels, predictions = _paired(labels, predictions)
  if isinstance(num_classes, bool) or not isinstance(num_classes,
                                                     (int, np.integer)):
    raise TypeError(f"num_classes must be an int, got {num_classes!r}.")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
  for name, ids in (("labels", labels), ("predictions", predictions)):
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.size:
      raise ValueError(
          f"{name} must lie in [0, {num_classes}), found {bad[0]} "
          f"({bad.size} out of range); check num_classes for this dataset.")
  flat = labels * num_classes + predictions
  counts = np.bincount(flat, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def pick_samples(labels, predictions, n: int = 9, seed: int = 0) -> np.ndarray:
  """Chooses ``n`` example indices to show, including some misclassified ones.

  Up to a third of the picks (more only when there are too few correct ones)
  are misclassified examples, so a sample grid shows the model's errors. The
  choice depends only on the inputs and ``seed``.

  Args:
    labels: true class ids, shape [N].
    predictions: predicted class ids, shape [N].
    n: number of indices wanted; fewer are returned when N < n.
    seed: seed of the random choice.

  Returns:
    Sorted int64 indices into the examples, shape [min(n, N)].
  """
  labels, predictions = _paired(labels, predictions)
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}.")
  n = min(n, labels.size)
  wrong = np.flatnonzero(labels != predictions)
  right = np.flatnonzero(labels == predictions)
  n_wrong = min(wrong.size, max(n // 3, n - right.size))
  rng = np.random.default_rng(seed)
  picked = np.concatenate([
      rng.choice(wrong, size=n_wrong, replace=False),
      rng.choice(right, size=n - n_wrong, replace=False),
  ])
  return np.sort(picked).astype(np.int64)


def _with_probabilities(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
  """``labels`` as class ids and ``probabilities`` as an array; ValueError unless it is
  [N, classes] with one row per label."""
  labels = _class_ids("labels", labels)
  probabilities = np.asarray(probabilities)
  if probabilities.ndim != 2 or probabilities.shape[0] != labels.size:
    raise ValueError(f"probabilities must be [N, classes] with N={labels.size} labels, got "
                     f"shape {probabilities.shape}.")
  return labels, probabilities


def top_losses(labels, probabilities, n: int) -> np.ndarray:
  """Indices of the ``n`` examples with the highest cross-entropy ``-log p(true class)``,
  highest first (ties in example order).

  >>> top_losses([0, 1, 1], [[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]], n=2).tolist()
  [1, 2]
  """
  labels, probabilities = _with_probabilities(labels, probabilities)
  true_probability = probabilities[np.arange(labels.size), labels]
  return np.argsort(true_probability, kind="stable")[:n].astype(np.int64)


def top_k_accuracy(labels, probabilities, k: int) -> float:
  """Fraction of examples whose true class is among the ``k`` most probable.

  A class ranks by how many classes have a strictly higher probability, so a tie with the
  k-th class counts as a hit.

  >>> top_k_accuracy([0, 1], [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]], k=2)
  0.5
  """
  labels, probabilities = _with_probabilities(labels, probabilities)
  if not labels.size:
    raise ValueError("top-k accuracy of zero examples is undefined; got empty labels.")
  true_probability = probabilities[np.arange(labels.size), labels]
  rank = np.sum(probabilities > true_probability[:, None], axis=1)
  return float(np.mean(rank < k))


def checked_confusion_matrix(cm, class_names: Sequence[str]) -> np.ndarray:
  """``cm`` as an array; ValueError unless it is square with one name per class."""
  cm = np.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"cm must be a square confusion matrix, got shape {cm.shape}.")
  if len(class_names) != cm.shape[0]:
    raise ValueError(f"got {len(class_names)} class names for a {cm.shape[0]}-class confusion "
                     "matrix; pass one name per class.")
  return cm


def classification_report(cm: np.ndarray, class_names, *, labels=None,
                          probabilities=None, top_k: int = 5) -> dict:
  """Per-class precision, recall, F1 and support, their macro and weighted averages, and
  accuracy, all from a confusion matrix (rows true, columns predicted).

  A class never predicted has precision 0, one absent from the labels recall 0 (as
  scikit-learn's ``zero_division=0``). Where there are more than ``top_k`` classes and
  ``labels`` and ``probabilities`` [N, classes] are given, adds ``top{k}_accuracy``.

  >>> r = classification_report(np.array([[3, 1], [0, 2]]), ["a", "b"])
  >>> r["classes"][0]
  {'name': 'a', 'precision': 1.0, 'recall': 0.75, 'f1': 0.8571428571428571, 'support': 4}
  """
  cm = checked_confusion_matrix(cm, class_names)
  true_positives = np.diagonal(cm).astype(np.float64)
  support, predicted = cm.sum(axis=1), cm.sum(axis=0)
  precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives),
                        where=predicted > 0)
  recall = np.divide(true_positives, support, out=np.zeros_like(true_positives),
                     where=support > 0)
  both = precision + recall
  f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)
  total = int(support.sum())
  scores = {"precision": precision, "recall": recall, "f1": f1}
  report = {
      "classes": [{"name": str(name), **{k: float(v[i]) for k, v in scores.items()},
                   "support": int(support[i])} for i, name in enumerate(class_names)],
      "macro_avg": {**{k: float(v.mean()) for k, v in scores.items()}, "support": total},
      "weighted_avg": {**{k: float(np.average(v, weights=support)) if total else 0.0
                          for k, v in scores.items()}, "support": total},
      "accuracy": float(true_positives.sum() / total) if total else 0.0,
  }
  if cm.shape[0] > top_k and labels is not None and probabilities is not None:
    report[f"top{top_k}_accuracy"] = top_k_accuracy(labels, probabilities, top_k)
  return report


def balanced_accuracy(report: dict) -> float:
  """The mean recall over the classes with examples, from :func:`classification_report`
  (scikit-learn's ``balanced_accuracy_score``).

  >>> balanced_accuracy(classification_report(np.array([[3, 1], [0, 2]]), ["a", "b"]))
  0.875
  """
  recalls = [c["recall"] for c in report["classes"] if c["support"]]
  return float(np.mean(recalls)) if recalls else 0.0


def format_classification_report(report: dict) -> str:
  """``report`` (from :func:`classification_report`) as a fixed-width table."""
  width = max(12, *(len(c["name"]) for c in report["classes"]))
  header = f"{'':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"

  def row(name, r):
    return (f"{name:<{width}} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['f1']:>9.4f} "
            f"{r['support']:>9}")

  lines = [header, *(row(c["name"], c) for c in report["classes"]), "",
           row("macro avg", report["macro_avg"]), row("weighted avg", report["weighted_avg"]),
           f"{'accuracy':<{width}} {report['accuracy']:>39.4f}"]
  lines += [f"{key.replace('_', ' '):<{width}} {value:>39.4f}"
            for key, value in report.items() if key.startswith("top")]
  return "\n".join(lines)
