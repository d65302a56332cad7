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
  """Remembers whether SIGTERM (or SIGINT, where asked) arrived while installed."""

  def __init__(self):
    self._event = threading.Event()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def request(self, signum: int = signal.SIGTERM, frame=None) -> None:
    del frame
    if not self._event.is_set():
      logging.warning("received %s: saving a checkpoint, then exiting",
                      signal.Signals(signum).name)
    self._event.set()

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
