"""What the host keeps count of as a phase trains, as plain data: an epoch's batches cut into
dispatches, the dispatch in flight, when a periodic checkpoint falls due, the epoch's sums and
the phase's training throughput. The run loop (``tljax.train``) drives them; they touch no
device."""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


def dispatch_size(steps_per_epoch: int, target: int) -> int:
  """Steps per dispatch: the largest divisor of ``steps_per_epoch`` in [target/2, target], so
  that an epoch's dispatches are all one size (a scanned dispatch compiles once per size);
  else ``target``, at most ``steps_per_epoch``.

  >>> dispatch_size(100, 30), dispatch_size(7, 4), dispatch_size(5, 100)
  (25, 4, 5)
  """
  target = min(target, steps_per_epoch)
  return next((k for k in range(target, max(1, target // 2) - 1, -1)
               if steps_per_epoch % k == 0), target)


def dispatches(order_SB: np.ndarray, position: int, size: int) -> list[np.ndarray]:
  """The batches of an epoch (``order_SB``, one row of example indices a step) from step
  ``position`` on, cut into dispatches of ``size`` steps, the last one shorter where needed.

  >>> [len(d) for d in dispatches(np.zeros((10, 2)), 3, 4)]
  [4, 3]
  """
  return [order_SB[start:start + size] for start in range(position, len(order_SB), size)]


def checkpoint_due(global_step: int, steps: int, every: int, epoch_end: bool) -> bool:
  """Whether a periodic checkpoint falls due after a dispatch of ``steps`` steps that ended at
  ``global_step``: it passed a multiple of ``every`` (0: never), and it did not end the epoch
  (whose end the phase saves).

  >>> checkpoint_due(12, 4, 10, False), checkpoint_due(8, 4, 10, False)
  (True, False)
  """
  crossed = bool(every) and global_step // every != (global_step - steps) // every
  return crossed and not epoch_end


@dataclasses.dataclass(frozen=True)
class InFlight:
  """A dispatched train chunk whose metrics the host has not read yet."""
  metrics: Any          # Per-step metrics, on the device.
  steps: int
  step: int             # The phase step and the global step after it.
  global_step: int
  dispatched: float     # time.perf_counter() at dispatch.


@dataclasses.dataclass
class EpochSums:
  """Sums over an epoch's steps: the loss of its finite steps, the correct predictions, and
  how many steps were finite and how many were skipped (non-finite)."""
  loss_sum: float = 0.0
  correct: int = 0
  finite_steps: int = 0
  skipped: int = 0

  def add(self, metrics: Mapping[str, np.ndarray], batch_size: int) -> tuple[float, float]:
    """Adds one dispatch's per-step metrics (``batch_size`` examples a step); returns its
    mean loss (NaN where no step was finite) and accuracy."""
    finite = metrics["finite"]
    self.loss_sum += float(np.sum(metrics["loss"][finite]))
    self.correct += int(np.sum(metrics["correct"]))
    self.finite_steps += int(finite.sum())
    self.skipped += int((~finite).sum())
    loss = float(np.mean(metrics["loss"][finite])) if finite.any() else float("nan")
    return loss, float(np.sum(metrics["correct"])) / (metrics["correct"].size * batch_size)

  @property
  def loss(self) -> float:
    """The mean loss of the finite steps (0 where there were none)."""
    return self.loss_sum / max(1, self.finite_steps)

  def accuracy(self, batch_size: int) -> float:
    """The fraction of the epoch's examples predicted right, skipped steps included."""
    return self.correct / max(1, (self.finite_steps + self.skipped) * batch_size)


@dataclasses.dataclass
class Throughput:
  """A phase's training images per second, over its dispatches after the first (which mostly
  compiles)."""
  compiled: bool = False    # Whether the phase's first dispatch is done.
  train_time: float = 0.0   # Seconds and images of the dispatches after the first.
  train_images: int = 0
  last_done: float = 0.0    # When the host saw the latest dispatch end (time.perf_counter()).

  def add(self, dispatched: float, done: float, images: int) -> float:
    """Counts a dispatch of ``images`` images, dispatched at ``dispatched`` and seen to end at
    ``done``; returns its seconds, from its dispatch or the previous one's end, whichever came
    later (the device runs one dispatch at a time)."""
    seconds = done - max(dispatched, self.last_done)
    self.last_done = done
    if self.compiled:
      self.train_time += seconds
      self.train_images += images
    self.compiled = True
    return seconds

  @property
  def images_per_s(self) -> float | None:
    """None until a dispatch after the first has ended."""
    return self.train_images / self.train_time if self.train_time else None
