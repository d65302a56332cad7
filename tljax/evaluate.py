"""Host-side evaluation: accuracy, confusion matrix, choice of samples to show.

All functions take integer class ids as NumPy-convertible 1-D arrays and are
pure; they never touch a device.
"""

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


def accuracy(labels, predictions) -> float:
  """Fraction of predictions equal to the labels."""
  labels, predictions = _paired(labels, predictions)
  if not labels.size:
    raise ValueError("accuracy of zero examples is undefined; got empty "
                     "labels and predictions.")
  return float(np.mean(labels == predictions))


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
  """Recall of each true class: diagonal / row sum, NaN for an empty row.

  >>> per_class_accuracy(np.array([[3, 1], [0, 0]]))
  array([0.75,  nan])
  """
  cm = np.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(
        f"cm must be a square confusion matrix, got shape {cm.shape}.")
  support = cm.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.diagonal(cm) / support.astype(np.float64)


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
