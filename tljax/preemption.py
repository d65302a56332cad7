"""SIGTERM handling: a stop request the run loop checks between device calls.

Spot VMs and Cloud TPU maintenance send SIGTERM, then kill the process seconds later. A
single process has to catch the signal itself (Orbax's preemption check only works under
``jax.distributed``); the loop then checkpoints the current step and exits.
"""

import contextlib
import logging
import signal
import threading


class Preempted(Exception):
  """Raised by the run loop after it checkpointed on a stop request."""


class StopSignal:
  """Remembers whether SIGTERM (or SIGINT, where asked) arrived while installed.

  The handler only records the signal: it runs in the main thread between two bytecodes,
  possibly in the middle of a write to the log stream. The first check that sees the
  request logs it.
  """

  def __init__(self):
    self._signum: int | None = None
    self._logged = False

  @property
  def requested(self) -> bool:
    if self._signum is not None and not self._logged:
      self._logged = True
      logging.warning("received %s: saving a checkpoint, then exiting",
                      signal.Signals(self._signum).name)
    return self._signum is not None

  def request(self, signum: int = signal.SIGTERM, frame=None) -> None:
    del frame
    self._signum = signum

  @contextlib.contextmanager
  def installed(self, signals=(signal.SIGTERM,)):
    """Handles ``signals`` inside the block (main thread only); restores the old handlers."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = {s: signal.signal(s, self.request) for s in signals}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
