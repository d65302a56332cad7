"""tljax.liveness: waits for other processes bounded by their heartbeats, in one process
over a dictionary standing in for the coordinator's key-value store."""

import os
import signal
import threading
import time

import pytest

from tljax import exits, liveness, preemption

STEP = "loading the dataset"


class Store:
  """The two calls of ``jax.distributed``'s key-value client that liveness uses."""

  def __init__(self):
    self.keys = {}

  def key_value_set(self, key, value, allow_overwrite=False):
    assert allow_overwrite or key not in self.keys
    self.keys[key] = value

  def key_value_dir_get(self, prefix):
    return [(k, v) for k, v in self.keys.items() if k.startswith(prefix)]


def wait(store, process=0, timeout_s=0.6):
  return liveness.Wait(store, STEP, process, 2, timeout_s)


def test_a_peer_that_keeps_beating_is_waited_for_longer_than_the_timeout(monkeypatch):
  monkeypatch.setattr(liveness, "HEARTBEAT_S", 0.1)
  store = Store()
  peer = wait(store, process=1)
  started = time.monotonic()

  def work():
    with peer.running():
      time.sleep(1.0)  # Longer than the waiter's timeout, 0.6 s.

  thread = threading.Thread(target=work)
  thread.start()
  wait(store).until_done([0, 1])
  thread.join()
  assert time.monotonic() - started > 1.0
  assert store.keys[f"tljax/{STEP}/ended/1"] == "done"
  assert int(store.keys[f"tljax/{STEP}/alive/1"]) >= 5  # A new counter every heartbeat.


def test_a_silent_peer_is_named_after_the_timeout():
  store = Store()
  store.keys[f"tljax/{STEP}/alive/1"] = "7"  # It said it was alive once, then nothing.
  started = time.monotonic()
  with pytest.raises(liveness.PeerLostError, match=(
      rf"process 1 has not said it is alive for 1 s while {STEP}: it crashed, hangs or cannot "
      r"reach the coordinator\. Check its log, .* the same data.dir; distributed.timeout_s")):
    wait(store).until_done([0, 1])
  assert 0.6 < time.monotonic() - started < 0.6 + 2 * liveness.SLICE_S


def test_a_peer_that_failed_or_was_stopped_ends_the_wait_at_once():
  store = Store()
  with pytest.raises(RuntimeError, match="refused"), wait(store, process=1).running():
    raise RuntimeError("refused")
  with pytest.raises(liveness.PeerLostError,
                     match=rf"^process 1 failed \(RuntimeError\) while {STEP}: its log says"):
    wait(store, timeout_s=60).until_done([0, 1])
  store.keys[f"tljax/{STEP}/ended/1"] = "stopped (SIGTERM)"
  with pytest.raises(preemption.Preempted, match=(
      rf"^process 1 was stopped \(SIGTERM\) while the processes were {STEP}$")) as e:
    wait(store, timeout_s=60).until_done([0, 1])
  assert e.value.exit_code == exits.PREEMPTED  # 143 on every host.


def test_a_sigterm_during_the_wait_stops_within_a_slice_and_tells_the_peers():
  store = Store()
  timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
  started = time.monotonic()
  timer.start()
  with pytest.raises(preemption.Preempted,
                     match=rf"^stopped by SIGTERM while waiting for process 1 to finish {STEP}$"
                     ) as e:
    wait(store, timeout_s=60).until_done([0, 1])
  assert time.monotonic() - started < 0.3 + 2 * liveness.SLICE_S
  assert e.value.exit_code == exits.PREEMPTED
  assert store.keys[f"tljax/{STEP}/ended/0"] == "stopped (SIGTERM)"
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The handler was restored.
