"""Multi-process runs: starting ``jax.distributed`` and agreeing across processes.

One process runs on each host (a Cloud TPU VM worker, a GPU node). All of them execute the
same program on the same global arrays over one mesh of every process's devices; each feeds
its own devices' rows of every global batch; process 0 alone writes logs, metrics, plots
and the summary. Checkpoints are written and restored by all processes together (Orbax).
"""

import contextlib
import glob
import importlib.util
import logging
import os

import jax
import ml_collections
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

from tljax import liveness

INITIALIZE_MODES = ("auto", "yes", "no")


def initialize(config: ml_collections.ConfigDict) -> None:
  """Starts ``jax.distributed`` as ``config`` (the ``distributed`` section) asks.

  ``auto`` starts it when any setting is given (the coordinator address also as
  ``JAX_COORDINATOR_ADDRESS``) or on a Cloud TPU VM, where JAX finds every setting itself;
  ``yes`` always (JAX detects Cloud TPU, SLURM, Open MPI and Kubernetes clusters); ``no``
  never. Call before anything else touches a device.
  """
  if config.initialize not in INITIALIZE_MODES:
    raise ValueError(f"distributed.initialize={config.initialize!r} is not one of "
                     f"{INITIALIZE_MODES}.")
  address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  given = address or config.num_processes or config.process_id >= 0
  wanted = config.initialize == "yes" or (
      config.initialize == "auto" and (given or _on_cloud_tpu_vm()))
  if not wanted or jax.distributed.is_initialized():
    return
  settings = {"coordinator_address": address or None,
              "num_processes": config.num_processes or None,
              "process_id": config.process_id if config.process_id >= 0 else None}
  try:
    # At exit a process waits for the others' exit too: bounded as every other wait.
    jax.distributed.initialize(**settings, initialization_timeout=config.timeout_s,
                               shutdown_timeout_seconds=config.timeout_s)
  except (ValueError, TypeError, RuntimeError) as e:
    given = ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None) or "nothing"
    raise ValueError(
        f"jax.distributed could not start ({given} given): {e}. On a machine JAX does not "
        "recognise as a cluster, pass --config.distributed.coordinator_address=<host:port of "
        "process 0>, --config.distributed.num_processes and --config.distributed.process_id "
        "to every process, or --config.distributed.initialize=no for a single process."
    ) from e
  logging.info("process %d of %d; %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _on_cloud_tpu_vm() -> bool:
  """A TPU VM with the TPU runtime installed: its chips appear as accel or vfio devices."""
  has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
  return has_chips and importlib.util.find_spec("libtpu") is not None


def is_main_process() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def process_index() -> int:
  return jax.process_index()


def all_processes(value) -> np.ndarray:
  """``value`` (a number, a flag or a list of them) of every process, stacked in process
  order; a collective, so call it everywhere."""
  value = np.asarray(value)
  if jax.process_count() == 1:
    return value[None]
  return np.asarray(multihost_utils.process_allgather(value))


def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is true on any; a collective, so call it everywhere."""
  return bool(np.any(all_processes(np.bool_(flag))))


@contextlib.contextmanager
def main_process_first(name: str, timeout_s: float):
  """Runs the block on process 0, then on the others (e.g. a download into shared storage),
  then waits until every process has run it.

  A process running the block may take any time: the waits are bounded by liveness, not by
  total time. Each process running it says it is alive every ``liveness.HEARTBEAT_S``; a
  waiting process gives up (``liveness.PeerLostError``) when a peer it waits for has not for
  ``timeout_s``, or failed in the block, and stops (``preemption.Preempted``) within a second
  of a SIGTERM or Ctrl-C to itself or to a peer.
  """
  if jax.process_count() == 1:
    yield
    return
  wait = liveness.Wait(_key_value_store(), name, jax.process_index(), jax.process_count(),
                       timeout_s)
  if not is_main_process():
    wait.until_done([0])
  with wait.running():
    yield
  wait.until_done(range(jax.process_count()))


def _key_value_store():
  """The key-value store of the ``jax.distributed`` coordinator (JAX has no public API to it)."""
  return jax_distributed.global_state.client
