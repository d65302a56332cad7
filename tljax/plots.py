"""Figures of a run: confusion matrix, sample predictions, training curves, the test images
with the highest loss, and the reliability diagram.

Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing opens a
window or touches global state. ``*_figure`` builds a figure; ``plot_*`` saves
it as a PNG, atomically, and returns the PNG's path.
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tljax import calibration, evaluate, files

_RIGHT, _WRONG = "tab:green", "tab:red"


def _new_figure(width: float, height: float) -> Figure:
  figure = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def save_png(figure: Figure, path: str | os.PathLike) -> str:
  """Writes ``figure`` to ``path`` as a PNG, atomically; returns the path."""
  with files.atomic_open(path, "wb") as f:
    figure.savefig(f, format="png", dpi=100)
  return os.fspath(path)


# ---------------------------------------------------------------- confusion matrix


def confusion_matrix_figure(cm: np.ndarray, class_names: Sequence[str],
                            title: str = "Confusion matrix") -> Figure:
  """Heat map of ``cm`` (rows true, columns predicted) with the count in each cell."""
  cm = evaluate.checked_confusion_matrix(cm, class_names)
  total = cm.sum()
  if total <= 0:
    raise ValueError("cm counts no examples; evaluate on a non-empty dataset.")
  n = cm.shape[0]
  size = 2.5 + 0.5 * n
  figure = _new_figure(size + 1.0, size)
  ax = figure.add_subplot()
  image = ax.imshow(cm, cmap="Blues", vmin=0, interpolation="nearest")
  figure.colorbar(image, ax=ax, shrink=0.8)
  ax.set_title(f"{title} (accuracy {np.trace(cm) / total:.2%})")
  ax.set_xlabel("Predicted label")
  ax.set_ylabel("True label")
  ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right",
                rotation_mode="anchor")
  ax.set_yticks(range(n), labels=class_names)
  for (row, col), count in np.ndenumerate(cm):
    red, green, blue, _ = image.cmap(image.norm(count))
    dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
    ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
            color="white" if dark else "black")
  return figure


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str],
                          path: str | os.PathLike, title: str = "Confusion matrix") -> str:
  """Saves ``confusion_matrix_figure(cm, class_names, title)`` to ``path``."""
  return save_png(confusion_matrix_figure(cm, class_names, title), path)


# ---------------------------------------------------------------- sample grid


def _images_for_display(images) -> np.ndarray:
  """Checks uint8 [N,H,W], [N,H,W,1] or [N,H,W,3]; returns [N,H,W] or [N,H,W,3]."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(f"images must be uint8 (raw pixels), got dtype {images.dtype}.")
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)) or not len(images):
    raise ValueError("images must have shape [N,H,W], [N,H,W,1] or [N,H,W,3] with N >= 1, "
                     f"got {images.shape}.")
  return images


def samples_figure(images, labels, predictions, class_names: Sequence[str]) -> Figure:
  """A square grid of images titled "true: X / pred: Y"; errors red and framed."""
  images = _images_for_display(images)
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if not len(images) == len(labels) == len(predictions):
    raise ValueError(f"got {len(images)} images, {len(labels)} labels and "
                     f"{len(predictions)} predictions; pass one of each per image.")
  ids = np.concatenate([labels, predictions])
  if ids.min() < 0 or ids.max() >= len(class_names):
    raise ValueError(f"class ids must lie in [0, {len(class_names)}) to name them, "
                     f"got {ids.min()}..{ids.max()}.")
  cols = math.ceil(math.sqrt(len(images)))
  rows = math.ceil(len(images) / cols)
  figure = _new_figure(2.4 * cols, 2.6 * rows)
  for i, (image, label, prediction) in enumerate(zip(images, labels, predictions)):
    ax = figure.add_subplot(rows, cols, i + 1)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    wrong = label != prediction
    color = _WRONG if wrong else _RIGHT
    ax.set_title(f"true: {class_names[label]} / pred: {class_names[prediction]}",
                 color=color, fontsize=10)
    for spine in ax.spines.values():
      spine.set_visible(wrong)
      spine.set_edgecolor(color)
      spine.set_linewidth(3)
  return figure


def plot_samples(images, labels, predictions, class_names: Sequence[str],
                 path: str | os.PathLike) -> str:
  """Saves ``samples_figure(images, labels, predictions, class_names)`` to ``path``.

  ``images`` are uint8 [N,H,W], [N,H,W,1] (grey) or [N,H,W,3] (RGB); 9 make a 3x3 grid.
  """
  return save_png(samples_figure(images, labels, predictions, class_names), path)


# ---------------------------------------------------------------- top losses


def top_losses_figure(images, labels, probabilities, class_names: Sequence[str],
                      indices) -> Figure:
  """fastai's ``plot_top_losses``: the images ``indices`` (highest loss first, from
  ``evaluate.top_losses``), each titled with its predicted and true class, its loss and the
  probability of the predicted class."""
  probabilities = np.asarray(probabilities)
  rows_sorted = np.sort(indices)
  pictures = _images_for_display(images[rows_sorted])[np.searchsorted(rows_sorted, indices)]
  cols = math.ceil(math.sqrt(len(indices)))
  rows = math.ceil(len(indices) / cols)
  figure = _new_figure(2.6 * cols, 2.9 * rows)
  figure.suptitle("Highest test losses: predicted / true / loss / probability")
  for i, (index, image) in enumerate(zip(indices, pictures)):
    ax = figure.add_subplot(rows, cols, i + 1)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    predicted, true = int(probabilities[index].argmax()), int(labels[index])
    loss = -math.log(max(float(probabilities[index, true]), 1e-38))
    ax.set_title(f"{class_names[predicted]} / {class_names[true]}\n"
                 f"{loss:.2f} / {probabilities[index, predicted]:.2f}",
                 color=_WRONG if predicted != true else _RIGHT, fontsize=9)
  return figure


def plot_top_losses(images, labels, probabilities, class_names: Sequence[str],
                    path: str | os.PathLike, n: int = 9) -> str:
  """Saves the ``n`` test images with the highest loss (``top_losses_figure``) to ``path``;
  ``images`` an array or a ``RowView``, uint8 as ``plot_samples`` takes them."""
  indices = evaluate.top_losses(labels, probabilities, n)
  return save_png(top_losses_figure(images, labels, probabilities, class_names, indices), path)


# ---------------------------------------------------------------- reliability diagram


def reliability_figure(curves: Mapping[str, np.ndarray], labels,
                       bins: int = calibration.BINS) -> Figure:
  """Accuracy against confidence per confidence bin for each of ``curves`` (a name, such as
  "before T", and its class probabilities [N, classes]), with the expected calibration error
  in the legend; a calibrated model lies on the diagonal."""
  figure = _new_figure(5.5, 5.0)
  ax = figure.add_subplot()
  ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="calibrated")
  for name, probabilities in curves.items():
    table = calibration.reliability_bins(probabilities, labels, bins)
    filled = table["count"] > 0
    ece = calibration.expected_calibration_error(probabilities, labels, bins)
    ax.plot(table["confidence"][filled], table["accuracy"][filled], marker="o",
            markersize=4, label=f"{name} (ECE {ece:.4f})")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel(f"Confidence of the predicted class ({bins} bins)")
  ax.set_ylabel("Accuracy")
  ax.set_title("Reliability diagram (test)")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left")
  return figure


def plot_reliability(curves: Mapping[str, np.ndarray], labels, path: str | os.PathLike,
                     bins: int = calibration.BINS) -> str:
  """Saves ``reliability_figure(curves, labels, bins)`` to ``path``."""
  return save_png(reliability_figure(curves, labels, bins), path)


# ---------------------------------------------------------------- training curves


def _by_epoch(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """Records in (phase, epoch) order; of repeated epochs (a resumed run) the last wins."""
  if not records:
    raise ValueError("records is empty; train for at least one epoch first.")
  for i, record in enumerate(records):
    missing = [key for key in ("phase", "epoch") if key not in record]
    if missing:
      raise ValueError(f"records[{i}] lacks {missing}; each per-epoch record needs "
                       f"'phase' and 'epoch', got keys {sorted(record)}.")
  latest = {(record["phase"], record["epoch"]): record for record in records}
  return [latest[key] for key in sorted(latest)]


def _points(x: np.ndarray, records: Sequence[Mapping[str, Any]], key: str):
  """(x, value) pairs of the records where ``key`` has a value."""
  pairs = [(xi, r[key]) for xi, r in zip(x, records) if r.get(key) is not None]
  return tuple(zip(*pairs)) if pairs else None


def curves_figure(records: Sequence[Mapping[str, Any]]) -> Figure:
  """Loss and accuracy per epoch, train and validation, phase starts marked.

  ``records`` are per-epoch dicts with "phase", "epoch" and any of "loss",
  "accuracy", "val_loss", "val_accuracy" (None or absent: not measured) and
  "phase_name". Epochs are numbered across phases, from 1.
  """
  records = _by_epoch(records)
  x = np.arange(1, len(records) + 1)
  phase_starts = {}
  for xi, record in zip(x, records):
    phase_starts.setdefault(record["phase"],
                            (xi, record.get("phase_name") or f"phase {record['phase']}"))
  figure = _new_figure(11.0, 4.2)
  for ax, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
    for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
      points = _points(x, records, key)
      if points:
        ax.plot(*points, marker="o", markersize=3, label=label)
    for start, name in phase_starts.values():
      ax.axvline(start - 0.5, color="gray", linestyle="--", linewidth=1)
      ax.text(start - 0.4, 0.98, name, transform=ax.get_xaxis_transform(),
              ha="left", va="top", fontsize=8, color="dimgray",
              bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    ax.set_title(metric.capitalize())
    ax.set_xlabel("Epoch (all phases)")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  return figure


def plot_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
  """Saves ``curves_figure(records)`` to ``path``."""
  return save_png(curves_figure(records), path)
