"""TensorBoard event files in the workdir, beside metrics.jsonl: ``tensorboard --logdir runs/``.

Written with tensorboardX (no TensorFlow needed). Every metrics record becomes scalars at its
global step: ``train/*`` per dispatch (loss, accuracy, learning rate, images/s),
``epoch/*`` and ``validation/*`` per epoch; the run's last picture is the test confusion
matrix. A resumed run appends a new event file; TensorBoard reads them as one run.
"""

import pathlib
from collections.abc import Mapping
from typing import Any

import matplotlib.image
import tensorboardX

_TRAIN_KEYS = ("loss", "accuracy", "learning_rate", "images_per_s", "skipped_steps")
_VALIDATION_KEYS = {"val_loss": "validation/loss", "val_accuracy": "validation/accuracy"}


class EventWriter:
  """Mirrors metrics records (``reporting.MetricsWriter``'s) as TensorBoard scalars.

  ``enabled=False`` writes nothing (all but the first process, or ``config.tensorboard``
  off).
  """

  def __init__(self, logdir: str | pathlib.Path, *, enabled: bool = True):
    self._writer = tensorboardX.SummaryWriter(logdir=str(logdir)) if enabled else None

  def write(self, record: Mapping[str, Any]) -> None:
    """Adds the record's numbers at its ``step``: ``kind`` "step" or "epoch"."""
    if self._writer is None:
      return
    prefix = "train" if record["kind"] == "step" else "epoch"
    tags = {key: f"{prefix}/{key}" for key in _TRAIN_KEYS}
    if record["kind"] == "epoch":
      tags.update(_VALIDATION_KEYS)
    for key, tag in tags.items():
      if record.get(key) is not None:
        self._writer.add_scalar(tag, float(record[key]), int(record["step"]))
    self._writer.flush()

  def add_image(self, tag: str, png_path: str | pathlib.Path, step: int) -> None:
    """Adds a PNG file (a plot the run wrote) as an image."""
    if self._writer is None:
      return
    image_HWC = matplotlib.image.imread(png_path)[..., :3]
    self._writer.add_image(tag, image_HWC, step, dataformats="HWC")
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()

  def __enter__(self) -> "EventWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
