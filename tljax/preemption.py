"""SIGTERM and Ctrl-C handling: a stop request the run loop checks between device calls.

Spot VMs and Cloud TPU maintenance send SIGTERM, then kill the process seconds later; users
press Ctrl-C (SIGINT). A single process has to catch the signal itself (Orbax's preemption
check only works under ``jax.distributed``); the loop then checkpoints the current step and
exits with 128 + the signal's number. A second Ctrl-C stops at once, as Ctrl-C usually does.
"""

import contextlib
import logging
import os
import signal
import threading

from tljax import exits


class Preempted(Exception):
  """Raised by the run loop after it checkpointed on a stop request.

  ``signum`` is None on a process that stopped because another process got the signal.
  """

  def __init__(self, message: str, signum: int | None = signal.SIGTERM):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended; 143
    (SIGTERM's) on a process that got no signal itself, so that every host of a stopped
    run exits with the same code as a preempted one."""
    return exits.PREEMPTED if self.signum is None else exits.of_signal(self.signum)


class StopSignal:
  """Remembers whether SIGTERM or SIGINT arrived while installed.

  The handler only records the signal: it runs in the main thread between two bytecodes,
  possibly in the middle of a write to the log stream. The first check that sees the
  request logs it.
  """

  def __init__(self):
    self.signum: int | None = None
    self._logged = False

  @property
  def requested(self) -> bool:
    if self.signum is not None and not self._logged:
      self._logged = True
      again = " (press Ctrl-C again to stop at once)" if self.signum == signal.SIGINT else ""
      logging.warning("received %s: saving a checkpoint, then exiting%s",
                      signal.Signals(self.signum).name, again)
    return self.signum is not None

  def request(self, signum: int = signal.SIGTERM, frame=None) -> None:
    """The handler: records ``signum``; a second SIGINT raises KeyboardInterrupt."""
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  @contextlib.contextmanager
  def installed(self, signals=(signal.SIGTERM, signal.SIGINT)):
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


@contextlib.contextmanager
def finishing(what: str):
  """Inside the block (the run's last step, ``what``) a SIGTERM does not stop the process: it
  is reported on stderr at once and the block finishes. Main thread only, as ``installed``."""
  def report(signum, frame):
    del frame
    # os.write, not logging: the handler may run in the middle of a log write.
    os.write(2, f"received {signal.Signals(signum).name} while {what}: finishing them first "
                "(if this process is killed before, rerunning the same command writes them "
                "again)\n".encode())

  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, report)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
