"""``python tests/fault_driver.py HOOK[=ARG][,HOOK...] MAIN_FLAGS...``: main.py with faults
injected (tests/test_reliability.py, tests/test_distributed*.py).

Each hook patches tljax (or, for SIGKILL mid-commit and the failed write, Orbax's public
classes) before main.py runs in this process. Run from the repository root.
"""

import errno
import importlib
import os
import runpy
import signal
import sys
import time

sys.path.insert(0, os.getcwd())

import jax.numpy as jnp  # noqa: E402 (after the path)
import orbax.checkpoint as ocp  # noqa: E402

from tljax import reporting, train  # noqa: E402
from tljax.models import weights  # noqa: E402


def signal_at_step(step, signum, process=None, again=False):
  """Sends ``signum`` right after the step record of global step ``step`` (on process
  ``process`` alone where given; ``again``: after every later step record too)."""
  import jax
  write = reporting.MetricsWriter.write

  def patched(self, record):
    write(self, record)
    due = record["step"] >= int(step) if again else record["step"] == int(step)
    if record["kind"] == "step" and due and process in (None, jax.process_index()):
      os.kill(os.getpid(), signum)

  reporting.MetricsWriter.write = patched


def sigint_at_step(step):
  signal_at_step(step, signal.SIGINT)


def sigint_again_from_step(step):
  """Ctrl-C after the step record of global step ``step``, and again after the next one."""
  signal_at_step(step, signal.SIGINT, again=True)


def jax_thread():
  """A daemon thread computing with JAX until the process ends, as the prefetch of streamed
  data does: Python's shutdown around it can abort the process."""
  import threading

  import jax
  import numpy as np

  def compute():
    x = np.ones((256, 256), np.float32)
    while True:
      jax.device_get(jnp.dot(jax.device_put(x), x))

  threading.Thread(target=compute, daemon=True).start()


def sigterm_in(where):
  """SIGTERM while ``tljax.<module>.<function>`` runs."""
  module_name, name = where.split(".")
  module = importlib.import_module(f"tljax.{module_name}")
  original = getattr(module, name)

  def patched(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  setattr(module, name, patched)


def sigterm_on_process(spec):
  """``P@STEP``: SIGTERM to process ``P`` alone, after the step record of global step STEP."""
  process, step = spec.split("@")
  signal_at_step(step, signal.SIGTERM, int(process))


def own_workdir():
  """Each process uses ``<workdir>/process-<id>``: hosts that do not share a workdir."""
  run = train.run

  def patched(config, workdir):
    return run(config, f"{workdir}/process-{config.distributed.process_id}")

  train.run = patched


def stall_loading(spec):
  """``P@S``: process ``P`` sleeps ``S`` seconds before it loads the dataset."""
  import jax

  from tljax.data import load
  process, seconds = spec.split("@")
  load_dataset = load.load_dataset

  def patched(*args, **kwargs):
    if jax.process_index() == int(process):
      time.sleep(float(seconds))
    return load_dataset(*args, **kwargs)

  load.load_dataset = patched


def sigterm_while_waiting(process):
  """SIGTERM to process ``process`` half a second into its first wait for other processes
  (tljax.liveness), logged with the time it is sent."""
  import logging
  import threading

  from tljax import liveness
  until_done = liveness.Wait.until_done

  def patched(self, processes):
    if self.process == int(process):
      def send():
        logging.warning("FAULT: sending SIGTERM")
        os.kill(os.getpid(), signal.SIGTERM)
      threading.Timer(0.5, send).start()
    return until_done(self, processes)

  liveness.Wait.until_done = patched


def sigkill_at_commit(step):
  """SIGKILL once checkpoint ``step`` is written, before it is renamed into place.

  ``ocp.path.atomicity`` is the public export of the temporary-path classes; the checkpoint
  manager uses ``AtomicRenameTemporaryPath`` unless told otherwise, and ``finalize`` is its
  rename into the final directory.
  """
  temporary_path = ocp.path.atomicity.AtomicRenameTemporaryPath
  finalize = temporary_path.finalize

  async def patched(self):
    if self.get_final().name == step:
      os.kill(os.getpid(), signal.SIGKILL)
    await finalize(self)

  temporary_path.finalize = patched


def fail_write(step):
  """The background write of checkpoint ``step`` fails with a full disk."""
  class NoSpace:
    def result(self, timeout=None):
      raise OSError(errno.ENOSPC, "No space left on device")

  async_save = ocp.StandardCheckpointHandler.async_save

  async def patched(self, directory, *args, **kwargs):
    futures = list(await async_save(self, directory, *args, **kwargs) or [])
    if f"/{step}.orbax-checkpoint-tmp/" in str(directory):
      futures.append(NoSpace())
    return futures

  ocp.StandardCheckpointHandler.async_save = patched


def no_weights():
  """Any load of the pretrained weights ends the process with 97 and a FAULT line."""
  def refuse(*args, **kwargs):
    print("FAULT: the weights were loaded again", file=sys.stderr)
    raise SystemExit(97)

  weights.load_pretrained = refuse


def count_rows_read():
  """Prints ``ROWS READ: n`` at exit: the rows of a decoded cache this process read."""
  import atexit

  import numpy as np

  from tljax.data import dataset
  getitem, read = dataset.RowView.__getitem__, [0]

  def counted(self, index):
    read[0] += 0 if isinstance(index, slice) else np.size(self.rows[index])
    return getitem(self, index)

  dataset.RowView.__getitem__ = counted
  atexit.register(lambda: print(f"ROWS READ: {read[0]}", file=sys.stderr))


HOOKS = {f.__name__: f for f in (sigint_at_step, sigint_again_from_step, jax_thread,
                                 sigterm_in, sigterm_on_process, own_workdir, stall_loading,
                                 sigterm_while_waiting, sigkill_at_commit, fail_write,
                                 no_weights, count_rows_read)}


def main(argv):
  for spec in filter(None, argv[1].split(",")):
    name, _, arg = spec.partition("=")
    HOOKS[name](*([arg] if arg else []))
  sys.argv = ["main.py", *argv[2:]]
  runpy.run_path("main.py", run_name="__main__")


if __name__ == "__main__":
  main(sys.argv)
