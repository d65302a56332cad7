"""What a run reports as it goes: metrics.jsonl, per-epoch progress, the log format.

Nothing here touches a device: pass host values (``jax.device_get`` them first,
or NumPy/JAX scalars that are already computed).
"""

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import tqdm

from tljax import files

_log = logging.getLogger(__name__)

_ABSL_FORMAT = ("%(levelname).1s%(asctime)s.%(msecs)03d %(process)d "
                "%(filename)s:%(lineno)d] %(message)s")


def setup_logging(level: int = logging.INFO) -> None:
  """Logs to stderr in absl's one-line format, unless logging is set up already.

  Under ``absl.app.run`` absl has installed its own handler and this does nothing.
  """
  logging.basicConfig(level=level, format=_ABSL_FORMAT, datefmt="%m%d %H:%M:%S")
  # Libraries that log through absl (Orbax logs every checkpoint step at INFO) stay quiet.
  logging.getLogger("absl").setLevel(max(level, logging.WARNING))



def _ends_mid_line(path: str) -> bool:
  if not os.path.exists(path) or not os.path.getsize(path):
    return False
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


class MetricsWriter:
  """Appends one JSON object per line to a file, durably.

  Each ``write`` is flushed and fsynced, so a crash loses nothing already
  written. Opening an existing file appends to it: a resumed run continues the
  same file. ``enabled=False`` writes nothing (all but the first process). NaN and
  infinity are written as ``null``. Each record also goes to ``mirrors`` (objects with
  ``write(record)`` and ``close()``, e.g. TensorBoard's), which are closed with the writer.

    with MetricsWriter(workdir / "metrics.jsonl") as w:
      w.write({"phase": 0, "epoch": 1, "loss": np.float32(0.31)})
  """

  def __init__(self, path: str | os.PathLike, *, enabled: bool = True, mirrors=()):
    self.path = os.fspath(path)
    self.mirrors = tuple(mirrors)
    self._file = None
    if not enabled:  # All but the first process of a multi-process run.
      return
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    ends_mid_line = _ends_mid_line(self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    if ends_mid_line:  # a run killed mid-write; start on a fresh line
      self._file.write("\n")

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends ``record`` as one line and syncs it to disk."""
    if self._file is not None and self._file.closed:
      raise ValueError(f"MetricsWriter for {self.path} is closed; open a new one.")
    if not isinstance(record, Mapping):
      raise TypeError(f"a metrics record must be a mapping, got {type(record).__name__}.")
    if self._file is None:
      return
    with files.write_errors_reported("appending to", self.path):
      self._file.write(files.to_json(dict(record)) + "\n")
      self._file.flush()
      os.fsync(self._file.fileno())
    for mirror in self.mirrors:
      mirror.write(record)

  def close(self) -> None:
    for mirror in self.mirrors:
      mirror.close()
    if self._file is not None:
      self._file.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file, skipping (with a warning) lines cut off by a crash."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      _log.warning("%s:%d: skipping a line that is not JSON (%s)", path, number, e)
  return records


def _format_metrics(metrics: Mapping[str, Any]) -> str:
  return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in metrics.items())


class Progress:
  """Reports progress through one epoch of ``total`` steps.

  On a terminal it draws a tqdm bar with the latest metrics and images/s; else
  (CI, log files) it logs one line at most every ``interval_s`` seconds and one
  at the end.

    with Progress(len(batches), "phase 0 epoch 1", batch_size=32) as progress:
      for batch in batches:
        ...
        progress.update(1, loss=loss, accuracy=acc)

  Args:
    total: steps in the epoch.
    desc: what the steps are, shown before the counts.
    enabled: False reports nothing (e.g. on all but the first process).
    stream: where the bar goes; default ``sys.stderr``. Plain lines go to ``logging``.
    interval_s: least seconds between two plain lines.
    batch_size: images per step; when given, images/s is reported.
    tty: True draws a bar, False logs lines; None asks ``stream.isatty()``.
  """

  def __init__(self, total: int, desc: str, *, enabled: bool = True,
               stream: IO[str] | None = None, interval_s: float = 10.0,
               batch_size: int | None = None, tty: bool | None = None):
    if total < 0:
      raise ValueError(f"total must be >= 0 steps, got {total}.")
    self.total, self.desc, self.batch_size = total, desc, batch_size
    self.steps = 0
    self.metrics: dict[str, Any] = {}
    self.images_per_s: float | None = None
    stream = sys.stderr if stream is None else stream
    if tty is None:
      tty = bool(getattr(stream, "isatty", lambda: False)())
    # images/s is measured over windows of this length; a bar refreshes it more often.
    self._window_s = min(interval_s, 1.0) if tty else interval_s
    self._start = self._window_start = time.monotonic()
    self._window_steps = 0
    self._closed = not enabled
    self._bar = (tqdm.tqdm(total=total, desc=desc, file=stream, unit="step",
                           dynamic_ncols=True) if enabled and tty else None)

  def update(self, n_steps: int = 1, **metrics: Any) -> None:
    """Records ``n_steps`` more steps and the latest ``metrics`` (host scalars)."""
    if self._closed:
      return
    self.steps += n_steps
    self.metrics.update({k: files.to_builtin(v) if hasattr(v, "__array__") else v
                         for k, v in metrics.items()})
    now = time.monotonic()
    due = now - self._window_start >= self._window_s
    if due:
      self._measure_rate(now, self._window_start, self._window_steps)
    if self._bar is not None:
      self._bar.update(n_steps)
      self._bar.set_postfix_str(self._summary(), refresh=False)
    elif due:
      _log.info("%s", self._line())

  def close(self) -> None:
    """Reports the whole epoch: its mean images/s and the last metrics. Idempotent."""
    if self._closed:
      return
    self._closed = True
    now = time.monotonic()
    self._measure_rate(now, self._start, 0)
    if self._bar is not None:
      self._bar.set_postfix_str(self._summary(), refresh=False)
      self._bar.close()
    else:
      _log.info("%s, done in %.1fs", self._line(), now - self._start)

  def _measure_rate(self, now: float, since: float, steps_then: int) -> None:
    if self.batch_size is not None and now > since:
      self.images_per_s = (self.steps - steps_then) * self.batch_size / (now - since)
    self._window_start, self._window_steps = now, self.steps

  def _summary(self) -> str:
    rate = "" if self.images_per_s is None else f" images/s={self.images_per_s:.1f}"
    return (_format_metrics(self.metrics) + rate).strip()

  def _line(self) -> str:
    percent = 100.0 * self.steps / self.total if self.total else 100.0
    counts = f"step {self.steps}/{self.total} ({percent:.0f}%)"
    return f"{self.desc}: {counts} {self._summary()}".rstrip()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
