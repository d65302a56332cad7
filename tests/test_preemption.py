"""tljax.preemption (SIGTERM and Ctrl-C become a stop request; a second Ctrl-C stops at once)
and tljax.exits (the exit code of each outcome)."""

import logging
import os
import signal
import threading

import pytest

from tljax import exits, preemption


def test_exit_codes():
  assert (exits.DONE, exits.FAILED, exits.BAD_INPUT) == (0, 1, 2)
  assert (exits.INTERRUPTED, exits.PREEMPTED) == (130, 143)
  assert exits.of_signal(signal.SIGKILL) == 137 and exits.of_signal(signal.SIGTERM) == 143


def test_preempted_exits_as_a_shell_reports_its_signal():
  assert preemption.Preempted("stopped").signum == signal.SIGTERM
  assert preemption.Preempted("stopped").exit_code == exits.PREEMPTED
  assert preemption.Preempted("stopped", signal.SIGINT).exit_code == exits.INTERRUPTED
  assert str(preemption.Preempted("checkpoint 3 is saved")) == "checkpoint 3 is saved"
  # A process that stopped because another one got the signal exits as a preempted one.
  assert preemption.Preempted("stopped", None).exit_code == exits.PREEMPTED


def test_a_second_sigint_stops_at_once():
  stop = preemption.StopSignal()
  with stop.installed():
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert preemption.Preempted("stopped", signal.SIGINT).exit_code == 130


def test_stop_signal_records_sigterm_and_restores_the_handler():
  stop, before = preemption.StopSignal(), signal.getsignal(signal.SIGTERM)
  with stop.installed():
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
  assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("signum, message", [
    (signal.SIGTERM, "received SIGTERM: saving a checkpoint, then exiting"),
    (signal.SIGINT, "received SIGINT: saving a checkpoint, then exiting (press Ctrl-C again "
                    "to stop at once)")])
def test_the_first_check_that_sees_the_request_logs_it_once(signum, message, caplog):
  stop = preemption.StopSignal()
  with caplog.at_level(logging.WARNING):
    assert not stop.requested
    stop.request(signum)
    assert stop.requested and stop.requested
    stop.request(signal.SIGTERM)  # A SIGTERM after any signal is recorded, never raised.
    assert stop.requested and stop.signum == signal.SIGTERM
  assert [r.getMessage() for r in caplog.records] == [message]


def test_installed_off_the_main_thread_handles_nothing():
  stop, before, seen = preemption.StopSignal(), signal.getsignal(signal.SIGTERM), []

  def worker():
    with stop.installed() as installed:
      seen.append((installed is stop, signal.getsignal(signal.SIGTERM)))

  thread = threading.Thread(target=worker)
  thread.start()
  thread.join()
  assert seen == [(True, before)]


def test_a_sigterm_while_finishing_is_reported_and_the_block_goes_on(capfd):
  before = signal.getsignal(signal.SIGTERM)
  with preemption.finishing("writing the outputs"):
    os.kill(os.getpid(), signal.SIGTERM)
    finished = True
  assert finished and signal.getsignal(signal.SIGTERM) is before
  assert capfd.readouterr().err == (
      "received SIGTERM while writing the outputs: finishing them first (if this process is "
      "killed before, rerunning the same command writes them again)\n")
