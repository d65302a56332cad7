"""Multi-process runs: start-up settings, and data parallelism across processes proven on
this machine.

Two processes with two forced CPU devices each (gloo collectives, a coordinator on
127.0.0.1) run the tiny two-phase job of tests/test_train.py; both are SIGKILLed in the
fine-tune and restarted, resume from their shared checkpoint, and must end with the
parameters of one process with one device (this one) on the same global batches.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile

import flax.serialization
import jax
import numpy as np
import pytest

from configs import default
from test_reliability import CONFIG_FILE, DRIVER
from test_train import read_events, tiny_config
from tljax import distributed, models, train
from tljax.models import weights

REPO = pathlib.Path(__file__).resolve().parents[1]

# SGD in both phases and BatchNorm in inference mode: the update is linear in the gradient,
# so float32 reductions in another order (across processes) stay at rounding level.
OVERRIDES = {"steps_per_dispatch": 2, "phases.0.optimizer": "sgd",
             "phases.0.learning_rate": 0.05, "phases.1.optimizer": "sgd",
             "phases.1.learning_rate": 0.01, "phases.1.batchnorm": "inference",
             "phases.1.epochs": 2, "distributed.timeout_s": 120}
KILL_AT_STEP = 26  # Global step: phase 1 is steps 1-16, the fine-tune 17-32.
TOLERANCE = 1e-5   # Absolute, on every parameter and BatchNorm statistic.


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
  with distributed.main_process_first("test"):
    pass


def test_bad_settings_name_the_fix(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  with pytest.raises(ValueError, match=r"initialize='maybe' is not one of \('auto'"):
    distributed.initialize(_settings(initialize="maybe"))
  # Asked for, on a machine that is no cluster JAX knows and with no coordinator given.
  with pytest.raises(ValueError, match=r"num_processes=2 given.*coordinator_address=<host:"):
    distributed.initialize(_settings(num_processes=2))
  assert not jax.distributed.is_initialized()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launcher(directory: pathlib.Path, default_config: pathlib.Path):
  """``launch(workdir, processes, devices_each, hooks, config) -> [(returncode, stderr)]``:
  main.py through tests/test_reliability.py's driver, in one or more processes on this
  machine, with ``default_config`` unless a config file is given."""
  (directory / "driver.py").write_text(DRIVER)

  def launch(workdir, processes, devices_each, hooks="", config=default_config):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
    flags = [f"--config={config}", f"--workdir={workdir}"]
    if processes > 1:
      flags += [f"--config.distributed.coordinator_address=127.0.0.1:{_free_port()}",
                f"--config.distributed.num_processes={processes}"]
    launch_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"{workdir.name}_", dir=directory))
    logs = [launch_dir / f"process_{i}.log" for i in range(processes)]
    children = [subprocess.Popen(
        [sys.executable, str(directory / "driver.py"), hooks, *flags,
         *([f"--config.distributed.process_id={i}"] if processes > 1 else [])],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        for i, log in enumerate(logs)]
    try:
      return [(child.wait(timeout=600), log.read_text()) for child, log in zip(children, logs)]
    finally:
      for child in children:
        child.kill()

  return launch


@pytest.fixture(scope="module")
def launch(tiny_idx_dir, tmp_path_factory):
  """``launcher`` of the tiny two-phase MNIST job."""
  root = tmp_path_factory.mktemp("multiprocess")
  config = root / "config.py"
  config.write_text(CONFIG_FILE.format(tests=str(REPO / "tests"), data_dir=str(tiny_idx_dir),
                                       overrides=OVERRIDES))
  return launcher(root, config)


@pytest.fixture(scope="module")
def runs(launch, tiny_idx_dir, tmp_path_factory):
  one = tmp_path_factory.mktemp("one_process")
  train.run(tiny_config(tiny_idx_dir, **OVERRIDES), one)
  two = tmp_path_factory.mktemp("two_processes")
  killed = launch(two, processes=2, devices_each=2, hooks=f"sigkill_at_step={KILL_AT_STEP}")
  resumed = launch(two, processes=2, devices_each=2)
  return one, two, killed, resumed


def _variables(workdir: pathlib.Path):
  return flax.serialization.msgpack_restore((workdir / "trained_variables.msgpack").read_bytes())


def test_both_processes_are_killed_then_resume_from_the_shared_checkpoint(runs):
  _, two, killed, resumed = runs
  assert [code for code, _ in killed] == [-signal.SIGKILL] * 2, killed[0][1][-3000:]
  assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
  resumed_from = int(resumed[0][1].split("resuming from checkpoint ")[1].split(":")[0])
  assert 16 <= resumed_from < KILL_AT_STEP
  assert "process 0 of 2; 2 local of 4 devices" in resumed[0][1]
  assert "resuming" not in resumed[1][1]  # Process 1 logs warnings and errors only.
  records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if r["kind"] == "step"]
  # One record per dispatch, written once (by process 0); the resumed steps again.
  assert steps == [*range(2, KILL_AT_STEP + 1, 2), *range(resumed_from + 2, 33, 2)]
  # TensorBoard (on in this config): only process 0 writes. One event file per launch for
  # the training records, and one for the test confusion matrix at the end.
  events = sorted(two.glob("events.out.tfevents.*"))  # Named by the second they began.
  assert len(events) == 3, [p.name for p in events]
  assert events[0].stat().st_size > 0  # The killed launch's: it may end mid-record.
  scalars, images = read_events(two, events[1:])
  # The resumed launch's records: from its first dispatch (the killed launch's came first).
  first_resumed = max(i for i, r in enumerate(records)
                      if r["kind"] == "step" and r["step"] == resumed_from + 2)
  resumed_records = records[first_resumed:]
  assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6))
                                   for r in resumed_records if r["kind"] == "step"]
  assert scalars["validation/accuracy"] == [(r["step"], pytest.approx(r["val_accuracy"]))
                                            for r in resumed_records if r["kind"] == "epoch"]
  assert images == {"test/confusion_matrix"}


def _worst_difference(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                          jax.tree.leaves(b)))


def test_two_processes_end_with_the_parameters_of_one(runs, tiny_idx_dir):
  one, two, _, _ = runs
  a, b = _variables(one), _variables(two)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert _worst_difference(a, b) < TOLERANCE
  config = tiny_config(tiny_idx_dir)
  initial = weights.load_pretrained("none", models.create(config.model, 10), input_size=32,
                                    rng=jax.random.PRNGKey(config.seed))
  assert _worst_difference(a["params"], jax.device_get(initial["params"])) > 1e-3  # It trained.
  summaries = [json.loads((w / "summary.json").read_text()) for w in (one, two)]
  assert [s["processes"] for s in summaries] == [1, 2]
  assert [len(s["devices"]) for s in summaries] == [1, 4]
  np.testing.assert_array_equal(np.load(one / "test_predictions.npz")["predictions"],
                                np.load(two / "test_predictions.npz")["predictions"])

