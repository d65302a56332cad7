"""Waits for other processes that are bounded by their liveness, not by total time.

A process doing work that may take long (loading or downloading the dataset) says it is
alive every ``HEARTBEAT_S`` in the ``jax.distributed`` key-value store, and at the end says
how the work ended. A process waiting for it gives up when it has not said it is alive for
``timeout_s``, or ended badly, and stops within ``SLICE_S`` of a SIGTERM or Ctrl-C.

Keys: ``tljax/<name>/alive/<process>`` (a counter, changed at each heartbeat: it is compared
with its last value on the waiting process's own clock, so hosts' clocks need not agree) and
``tljax/<name>/ended/<process>`` (``done``, ``failed (<error>)`` or ``stopped (<signal>)``).
"""

import contextlib
import signal
import threading
import time

from tljax import preemption

HEARTBEAT_S = 1.0  # How often a working process says it is alive.
SLICE_S = 0.25     # How often a waiting process looks at the store and its stop signal.
DONE = "done"


class PeerLostError(RuntimeError):
  """A process this one waits for stopped saying it is alive, or failed."""


class Wait:
  """One step that every process of a run goes through (``name``), over ``store`` (the
  coordinator's key-value client: ``key_value_set`` and ``key_value_dir_get``)."""

  def __init__(self, store, name: str, process: int, processes: int, timeout_s: float):
    self.store, self.name, self.process = store, name, process
    self.processes, self.timeout_s = processes, timeout_s

  @contextlib.contextmanager
  def running(self):
    """Says this process is alive inside the block; at its end, how the block ended."""
    finished = threading.Event()
    thread = threading.Thread(target=self._beat, args=(finished,), daemon=True,
                              name=f"tljax heartbeat: {self.name}")
    thread.start()
    try:
      yield
    except BaseException as e:
      self._set("ended", f"failed ({type(e).__name__})")
      raise
    finally:
      finished.set()
      thread.join()
    self._set("ended", DONE)

  def until_done(self, processes) -> None:
    """Returns once every process of ``processes`` (this one aside) ended its block well.

    Raises PeerLostError naming the process that failed or was silent for ``timeout_s``,
    and preemption.Preempted (exit 143 or 130) on a stop signal to this process or a peer.
    """
    waiting = [p for p in processes if p != self.process]
    heard = {p: (None, time.monotonic()) for p in waiting}  # Last counter, when it changed.
    stop = preemption.StopSignal()
    with stop.installed():
      while waiting:
        if stop.signum is not None:
          name = signal.Signals(stop.signum).name
          self._set("ended", f"stopped ({name})")
          raise preemption.Preempted(f"stopped by {name} while waiting for "
                                     f"{_processes(waiting)} to finish {self.name}", stop.signum)
        waiting = self._still_waiting(waiting, heard)
        if waiting:
          time.sleep(SLICE_S)

  def _still_waiting(self, waiting: list[int], heard: dict) -> list[int]:
    """``waiting`` less the processes that are done; raises for one that failed or went
    silent (``heard`` is updated with the counters read)."""
    keys = self._read()
    now = time.monotonic()
    for p in waiting:
      ended = keys.get(("ended", p))
      if ended is not None and ended.startswith("stopped"):
        raise preemption.Preempted(f"process {p} was {ended} while the processes were "
                                   f"{self.name}", None)
      if ended is not None and ended != DONE:
        raise PeerLostError(f"process {p} {ended} while {self.name}: its log says why.")
      counter = keys.get(("alive", p))
      if counter != heard[p][0]:
        heard[p] = (counter, now)
      elif ended is None and now - heard[p][1] > self.timeout_s:
        raise PeerLostError(
            f"process {p} has not said it is alive for {self.timeout_s:.0f} s while "
            f"{self.name}: it crashed, hangs or cannot "
            "reach the coordinator. Check its log, that its host is up and reaches process "
            "0's host, and that it reads the same data.dir; distributed.timeout_s sets this "
            "wait.")
    return [p for p in waiting if keys.get(("ended", p)) != DONE]

  def _beat(self, finished: threading.Event) -> None:
    """The heartbeat thread: a new counter every HEARTBEAT_S until ``finished``."""
    count = 0
    while True:
      try:
        self._set("alive", str(count))
      except Exception:  # noqa: BLE001 - the coordinator is gone; the main thread will see it
        return
      count += 1
      if finished.wait(HEARTBEAT_S):
        return

  def _set(self, kind: str, value: str) -> None:
    self.store.key_value_set(f"tljax/{self.name}/{kind}/{self.process}", value,
                             allow_overwrite=True)

  def _read(self) -> dict[tuple[str, int], str]:
    """Every key of this step: ``{(kind, process): value}``."""
    keys = {}
    for key, value in self.store.key_value_dir_get(f"tljax/{self.name}/"):
      kind, process = key.rsplit("/", 2)[-2:]
      keys[kind, int(process)] = value
    return keys


def _processes(processes: list[int]) -> str:
  return ("process " if len(processes) == 1 else "processes ") + ", ".join(map(str, processes))
