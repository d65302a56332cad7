"""Multi-process runs: start-up settings, and data parallelism across processes proven on
this machine.

Two processes with two forced CPU devices each (gloo collectives, a coordinator on
127.0.0.1) run the tiny two-phase job of helpers.tiny_config; process 1 alone gets a SIGTERM
in the fine-tune, both stop with 143 and are restarted, resume from their shared checkpoint,
and must end with the parameters of one process with one device (this one) on the same global
batches. Two processes given separate work directories are refused within
``distributed.timeout_s``, and a SIGTERM to process 0 while process 1 is still loading the
dataset stops both with 143 (the heartbeat logic itself is tested in test_liveness.py).
"""

import json
import time

import jax
import numpy as np
import pytest

from configs import default
from helpers import MULTIPROCESS_TOLERANCE as TOLERANCE
from helpers import (launcher, read_events, read_records, read_variables, tiny_config,
                     worst_difference, write_tiny_config)
from tljax import distributed, models, train
from tljax.models import weights

# SGD in both phases and BatchNorm in inference mode: the update is linear in the gradient,
# so float32 reductions in another order (across processes) stay at rounding level. The
# fine-tune trains the last convolution and the head (cheap to compile on four devices).
# Checkpoints at the phase ends and on SIGTERM only: each is a wait for both processes.
OVERRIDES = {"steps_per_dispatch": 2, "checkpoint_every_steps": 0, "phases.0.optimizer": "sgd",
             "phases.0.learning_rate": 0.05, "phases.1.optimizer": "sgd",
             "phases.1.learning_rate": 0.01, "phases.1.batchnorm": "inference",
             "phases.1.epochs": 2, "phases.1.rules": ("freeze:layers[:151]", "train:.*"),
             "distributed.timeout_s": 120}
SIGTERM_AT_STEP = 26  # Global step: phase 1 is steps 1-16, the fine-tune 17-32.


def _settings(**overrides):
  config = default.get_config().distributed
  config.update(overrides)
  return config


def test_single_process_unless_asked(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  distributed.initialize(_settings())
  distributed.initialize(_settings(initialize="no", coordinator_address="10.0.0.1:1234"))
  assert not jax.distributed.is_initialized()
  assert distributed.is_main_process() and distributed.any_process(True)
  assert not distributed.any_process(False)
  with distributed.main_process_first("test", timeout_s=1):
    pass


def test_bad_settings_name_the_fix(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  with pytest.raises(ValueError, match=r"initialize='maybe' is not one of \('auto'"):
    distributed.initialize(_settings(initialize="maybe"))
  # Asked for, on a machine that is no cluster JAX knows and with no coordinator given.
  with pytest.raises(ValueError, match=r"num_processes=2 given.*coordinator_address=<host:"):
    distributed.initialize(_settings(num_processes=2))
  assert not jax.distributed.is_initialized()


@pytest.fixture(scope="module")
def launch(tiny_idx_dir, tmp_path_factory):
  """``launcher`` of the tiny two-phase MNIST job."""
  root = tmp_path_factory.mktemp("multiprocess")
  return launcher(root, write_tiny_config(root / "config.py", tiny_idx_dir, OVERRIDES))


@pytest.fixture(scope="module")
def runs(launch, tiny_idx_dir, tmp_path_factory):
  one = tmp_path_factory.mktemp("one_process")
  train.run(tiny_config(tiny_idx_dir, **OVERRIDES), one)
  two = tmp_path_factory.mktemp("two_processes")
  stopped = launch(two, processes=2, devices_each=2,
                   hooks=f"sigterm_on_process=1@{SIGTERM_AT_STEP}")
  resumed = launch(two, processes=2, devices_each=2)
  return one, two, stopped, resumed


def test_a_sigterm_to_one_process_stops_both_with_143_then_both_resume(runs):
  _, two, stopped, resumed = runs
  assert [code for code, _ in stopped] == [143, 143], stopped[0][1][-3000:]
  assert "received SIGTERM" in stopped[1][1] and "received SIGTERM" not in stopped[0][1]
  # The dispatch in flight when process 1 got the signal is finished and saved by both.
  saved = SIGTERM_AT_STEP + 2
  assert f"checkpoint {saved} is saved; rerun the same command to resume" in stopped[0][1]
  assert "Traceback" not in stopped[0][1] + stopped[1][1]
  assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
  assert f"resuming from checkpoint {saved}:" in resumed[0][1]
  assert "process 0 of 2; 2 local of 4 devices" in resumed[0][1]
  assert "resuming" not in resumed[1][1]  # Process 1 logs warnings and errors only.
  assert not list(two.glob("*.lock"))  # Each launch released its lock files.
  records = read_records(two)
  steps = [r["step"] for r in records if r["kind"] == "step"]
  # One record per dispatch, written once (by process 0), none repeated.
  assert steps == list(range(2, 33, 2))
  # TensorBoard (on in this config): only process 0 writes. One event file per launch for
  # the training records, and one for the test confusion matrix at the end.
  events = sorted(two.glob("events.out.tfevents.*"))  # Named by the second they began.
  assert len(events) == 3, [p.name for p in events]
  assert events[0].stat().st_size > 0
  scalars, images = read_events(two, events[1:])
  # The resumed launch's records: from its first dispatch (the killed launch's came first).
  first_resumed = max(i for i, r in enumerate(records)
                      if r["kind"] == "step" and r["step"] == saved + 2)
  resumed_records = records[first_resumed:]
  assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6))
                                   for r in resumed_records if r["kind"] == "step"]
  assert scalars["validation/accuracy"] == [(r["step"], pytest.approx(r["val_accuracy"]))
                                            for r in resumed_records if r["kind"] == "epoch"]
  assert images == {"test/confusion_matrix"}


def test_two_processes_end_with_the_parameters_of_one(runs, tiny_idx_dir):
  one, two, _, _ = runs
  a, b = read_variables(one), read_variables(two)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert worst_difference(a, b) < TOLERANCE
  config = tiny_config(tiny_idx_dir)
  initial = weights.load_pretrained("none", models.create(config.model, 10), input_size=32,
                                    rng=jax.random.PRNGKey(config.seed))
  assert worst_difference(a["params"], jax.device_get(initial["params"])) > 1e-3  # It trained.
  summaries = [json.loads((w / "summary.json").read_text()) for w in (one, two)]
  assert [s["processes"] for s in summaries] == [1, 2]
  assert [len(s["devices"]) for s in summaries] == [1, 4]
  np.testing.assert_array_equal(np.load(one / "test_predictions.npz")["predictions"],
                                np.load(two / "test_predictions.npz")["predictions"])



def test_processes_that_do_not_share_the_workdir_are_told_within_the_timeout(
    launch, tiny_idx_dir, tmp_path):
  timeout_s = 5
  config = write_tiny_config(tmp_path / "config.py", tiny_idx_dir,
                             {**OVERRIDES, "distributed.timeout_s": timeout_s})
  started = time.monotonic()
  outcome = launch(tmp_path / "run", processes=2, devices_each=1, hooks="own_workdir",
                   config=config)
  assert time.monotonic() - started < timeout_s + 45  # Start-up, data and the wait.
  assert [code for code, _ in outcome] == [2, 2], outcome[0][1][-3000:]
  for process, (_, log) in enumerate(outcome):
    assert (f"--workdir {tmp_path}/run/process-{process} is not one directory shared by every "
            "process: process 0 does not see process 1's; process 1 does not see process 0's "
            f"lock file there after {timeout_s} s. Every host must use the same work "
            "directory") in log, log[-3000:]
  assert not list((tmp_path / "run").rglob("checkpoints"))


def test_a_sigterm_while_waiting_for_a_process_still_loading_stops_both_with_143(
    launch, tmp_path):
  stall_s = 3  # Process 0 waits from when it loaded; its SIGTERM comes 0.5 s later.
  outcome = launch(tmp_path / "run", processes=2, devices_each=1,
                   hooks=f"stall_loading=1@{stall_s},sigterm_while_waiting=0")
  (code0, log0), (code1, log1) = outcome
  assert [code0, code1] == [143, 143], log0[-3000:] + log1[-3000:]
  stopped = ("stopped by SIGTERM while waiting for process 1 to finish loading the dataset; "
             "rerun the same command to resume.")
  assert stopped in log0, log0[-3000:]
  assert _logged_at(log0, stopped) - _logged_at(log0, "FAULT: sending SIGTERM") < 1.0
  assert ("process 0 was stopped (SIGTERM) while the processes were loading the dataset; "
          "rerun the same command to resume.") in log1, log1[-3000:]
  assert "Traceback" not in log0 + log1
  assert not list((tmp_path / "run").rglob("checkpoints"))


def _logged_at(log: str, message: str) -> float:
  """The time of day (s) of absl's log line holding ``message``."""
  line = next(line for line in log.splitlines() if message in line)
  hours, minutes, seconds = line.split()[1].split(":")
  return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
