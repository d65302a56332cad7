"""``audit_gallery.png``: the top findings of an audit, as images with captions.

A duplicate pair shows both images side by side; a suspected label error shows the image with
its label and the suggested class.
"""

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tljax import plots

COLUMNS = 6
_CAPTION_CHARS = 26


class Panel(NamedTuple):
  """One image of the gallery and its caption lines."""
  image: np.ndarray   # uint8 [H, W] or [H, W, 3]
  caption: str


def _short(path: str) -> str:
  """The end of a long path, which names the class folder and file."""
  return path if len(path) <= _CAPTION_CHARS else "..." + path[-_CAPTION_CHARS + 3:]


def pair_panels(kind: str, images: Sequence[np.ndarray], paths: Sequence[str],
                detail: str = "") -> list[Panel]:
  """The two panels of a duplicate pair: ``kind`` (and ``detail``) above each path."""
  return [Panel(image, f"{kind}{detail}\n{_short(path)}") for image, path in zip(images, paths)]


def suspect_panel(image: np.ndarray, path: str, label: str, suggested: str,
                  score: float) -> Panel:
  """A suspected label error: its label, the suggested class and score, and its path."""
  return Panel(image, f"label {label}\nsuggested {suggested} ({score:.2f})\n{_short(path)}")


def gallery_figure(rows: Sequence[Sequence[Panel]]) -> Figure:
  """A grid of ``COLUMNS`` columns, one row of panels per entry of ``rows``."""
  rows = [row for row in rows if row] or [[]]
  figure = Figure(figsize=(2.3 * COLUMNS, 2.9 * len(rows)), layout="constrained")
  FigureCanvasAgg(figure)
  if not rows[0]:
    figure.text(0.5, 0.5, "The audit found no duplicates and no suspected label errors.",
                ha="center", va="center")
  for r, row in enumerate(rows):
    for c, panel in enumerate(row[:COLUMNS]):
      ax = figure.add_subplot(len(rows), COLUMNS, r * COLUMNS + c + 1)
      image = panel.image[..., 0] if panel.image.ndim == 3 and panel.image.shape[-1] == 1 \
          else panel.image
      ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(panel.caption, fontsize=7)
  return figure


def plot_gallery(rows: Sequence[Sequence[Panel]], path: str | os.PathLike) -> str:
  """Saves ``gallery_figure(rows)`` to ``path`` as a PNG, atomically; returns the path."""
  return plots.save_png(gallery_figure(rows), path)
