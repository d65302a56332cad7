"""The Keras baseline of ``step_throughput.py``: one process per framework, phase kind, batch
and input size, started by that script through :func:`start_workers`.

    python benchmarks/keras_worker.py keras_tf fine_tune 32 32

Builds the tutorial's model with the phase kind's trainable set, compiles it (Adam), reports
its compile time, then, for each line on stdin (a number of seconds), times ``train_on_batch``
for that long and prints the step times. Every report is a ``RESULT {json}`` line on stdout.
Imports only the standard library, numpy, ``timing.py`` and Keras (``keras_jax``: Keras 3 on
the JAX backend; ``keras_tf``: ``tensorflow.keras``), so a plain TensorFlow environment can
run ``keras_tf``.
"""

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

import timing

KINDS = ("keras_jax", "keras_tf")
PHASES = ("frozen_base", "fine_tune", "full")
NUM_CLASSES = 10


def import_keras(kind: str):
  """Keras for ``kind`` and a line naming its versions."""
  # With Keras 3 installed, tf.keras is Keras 3 too, on the backend this variable names.
  os.environ["KERAS_BACKEND"] = "tensorflow" if kind == "keras_tf" else "jax"
  if kind == "keras_tf":
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.keras, f"keras {tf.keras.__version__}, tensorflow {tf.__version__}"
  import keras  # pylint: disable=import-outside-toplevel
  return keras, f"keras {keras.__version__}, jax {importlib.metadata.version('jax')}"


def keras_model(keras, phase: str, size: int):
  """The tutorial's model and trainable set, compiled with Adam."""
  base = keras.applications.MobileNetV2(weights=None, include_top=False,
                                        input_shape=(size, size, 3))
  base.trainable = phase != "frozen_base"
  if phase == "fine_tune":
    for layer in base.layers[:100]:
      layer.trainable = False
  inputs = keras.Input((size, size, 3))
  x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
  model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, activation="softmax")(x))
  learning_rate = 1e-3 if phase == "frozen_base" else 1e-5
  model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                loss="sparse_categorical_crossentropy", metrics=["accuracy"])
  return model


class WorkerError(RuntimeError):
  """A baseline process failed; the message holds the end of its stderr."""


class Worker:
  """This script running as its own process with ``python``, for one baseline and case."""

  def __init__(self, kind: str, phase: str, batch: int, size: int, python: str, seed: int):
    # On an accelerator this process already holds most of its memory: workers allocate
    # only what they use.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    command = [python, __file__, kind, phase, str(batch), str(size), "--seed", str(seed)]
    self.kind, self.python, self.log = kind, python, tempfile.TemporaryFile("w+")
    self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True, env=env)
    self.info: dict[str, Any] = {}

  def wait_ready(self) -> None:
    """Waits until the worker has compiled and warmed up its step."""
    self.info = self._read()

  def _read(self) -> dict[str, Any]:
    result = timing.find_result(self.proc.stdout)
    if result is not None:
      return result
    code = self.proc.wait()
    self.log.seek(0)
    last = (self.log.read().strip().splitlines() or ["no output"])[-1]
    raise WorkerError(f"{self.kind} process ({self.python}) exited with status {code}: {last}"
                      + (" (see --tf_python)" if self.kind == "keras_tf" else ""))

  def time(self, seconds: float) -> list[float]:
    self.proc.stdin.write(f"{seconds}\n")
    self.proc.stdin.flush()
    return self._read()["times"]

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()


def start_workers(kinds: list[str], phases: list[str], batch: int, size: int, tf_python: str,
                  seed: int) -> dict[tuple[str, str], Worker]:
  """One worker per baseline kind and phase kind, started and left compiling; ``keras_tf``
  runs with ``tf_python``."""
  workers = {}
  for kind in kinds:
    for phase in phases:
      print(f"starting {kind} {phase}, batch {batch}, {size}x{size} ...", flush=True)
      python = tf_python if kind == "keras_tf" else sys.executable
      workers[kind, phase] = Worker(kind, phase, batch, size, python, seed)
  return workers


def ready_workers(workers: dict[tuple[str, str], Worker],
                  failed: dict[str, str]) -> dict[tuple[str, str], Worker]:
  """The workers that got ready; a kind that fails once is recorded in ``failed`` (kind ->
  message) and its other workers are closed unread."""
  ready = {}
  for (kind, phase), worker in workers.items():
    try:
      if kind in failed:
        raise WorkerError(failed[kind])
      worker.wait_ready()
      ready[kind, phase] = worker
    except WorkerError as e:
      failed[kind] = str(e)
      print(f"  {kind} {phase} skipped: {e}", flush=True)
      worker.close()
  return ready


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("kind", choices=KINDS)
  parser.add_argument("phase", choices=PHASES)
  parser.add_argument("batch", type=int)
  parser.add_argument("size", type=int)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  keras, version = import_keras(args.kind)
  rng = np.random.default_rng(args.seed)
  x = rng.random((args.batch, args.size, args.size, 3), np.float32)
  y = rng.integers(0, NUM_CLASSES, args.batch).astype(np.int32)
  model = keras_model(keras, args.phase, args.size)
  t0 = time.perf_counter()
  model.train_on_batch(x, y)
  compile_s = time.perf_counter() - t0
  model.train_on_batch(x, y)  # Warm-up.
  trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
  print(timing.result_line({"compile_s": compile_s, "version": version,
                            "trainable_params": trainable}), flush=True)
  for line in sys.stdin:
    times = timing.time_calls(lambda: model.train_on_batch(x, y), float(line))
    print(timing.result_line({"times": times}), flush=True)


if __name__ == "__main__":
  main()
