"""The run: phases of training with checkpoints between and within them, then evaluation.

``run(config, workdir)`` is the whole job: check the config (``checks``), load the data
(``data.load``), build the model (``models``) and the phases (``phases``), start from the
newest good checkpoint or the pretrained weights (``resume``), train each phase, write the
outputs (``outputs``). A phase trains for its epochs, dispatching ``steps_per_dispatch``
compiled steps (``dispatch``) between host syncs, from the images or from its frozen prefix's
cache (``prefix``), the host keeping count (``epochs``); it validates each epoch and
checkpoints periodically, at epoch ends and at its end. A restart in the same workdir resumes
where the run stopped.
"""

import dataclasses
import functools
import logging
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tljax import checkpoint, checks, dispatch, distributed, epochs, files, freezing, models
from tljax import outputs, phases, preemption, prefix, reporting, resume, selection, sharding
from tljax import audit, steps, tensorboard, workdir_lock
from tljax.data import dataset, folder, load, sources, transforms
from tljax.models import weights
from tljax.models.layer_stack import LayerStack
from tljax.phases import Phase


@dataclasses.dataclass
class RunContext:
  """What every phase shares: config, mesh, model, data on device, outputs, checkpoints."""
  config: ml_collections.ConfigDict
  mesh: Any
  model: LayerStack
  phases: tuple[Phase, ...]                           # Every phase, built once.
  view: transforms.EvalView                           # The evaluation view, built once.
  splits: Mapping[str, dataset.Split]
  sources: Mapping[str, Any]                          # split -> data.sources source
  checkpointer: checkpoint.Checkpointer
  metrics: reporting.MetricsWriter
  stop: Any                                            # preemption.StopSignal
  meta: dict                                           # What checkpoints carry beside state.
  # (phase index, cut) -> that phase's prefix caches, built by the phase before it.
  handoff: dict[tuple[int, int], prefix.PhaseSources] = dataclasses.field(default_factory=dict)

  def size(self, split: str) -> int:
    return len(self.splits[split].labels)


def _save(ctx: RunContext, phase: Phase, state: steps.TrainState, global_step: int) -> None:
  ctx.meta.update(phase=phase.index, phase_step=int(state.step), global_step=global_step)
  ctx.checkpointer.save(global_step, state, ctx.meta)


def _stop_if_requested(ctx: RunContext, phase: Phase, state: steps.TrainState,
                       global_step: int) -> None:
  """After SIGTERM or Ctrl-C: ``_stop``.

  Called between device calls: after each train chunk, the prefix cache, each evaluation
  and each phase, at the same points on every process, which stop together.
  """
  if distributed.any_process(ctx.stop.requested):
    _stop(ctx, phase, state, global_step)


def _stop(ctx: RunContext, phase: Phase, state: steps.TrainState, global_step: int) -> None:
  """Checkpoints this point (unless saved already), waits, raises Preempted."""
  ctx.checkpointer.wait()
  if ctx.checkpointer.latest_step() != global_step:
    _save(ctx, phase, state, global_step)
    ctx.checkpointer.wait()
  raise preemption.Preempted(f"stopped in phase {phase.name} at step {int(state.step)} of "
                             f"{phase.total_steps}; checkpoint {global_step} is saved",
                             ctx.stop.signum)


# ---------------------------------------------------------------------------------------------
# Epochs.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PhaseLoop:
  """What a phase's epochs share: the phase, its compiled functions, the sources they read,
  the steps a dispatch runs, and the phase's throughput so far."""
  phase: Phase
  train_chunk: Any
  eval_batch: Any
  sources: prefix.PhaseSources
  dispatch_size: int
  throughput: epochs.Throughput


def train_epoch(ctx: RunContext, loop: _PhaseLoop, state: steps.TrainState, step: int,
                global_step: int):
  """Trains the epoch that ``step`` is in, to its end; returns the state, step, global step
  and the epoch's record (validated).

  The host reads each dispatch's metrics (the one host sync) after dispatching the next, so
  the device never waits for the records, the progress bar or a file sync. A checkpoint
  follows the reading of its own steps' metrics, so a non-finite run stops first.
  """
  phase, batch = loop.phase, ctx.config.batch_size
  epoch, position = divmod(step, phase.steps_per_epoch)
  order_SB = sources.epoch_order(ctx.config.seed, phase.index, epoch, ctx.size("train"),
                                 phase.steps_per_epoch, batch)
  batches = epochs.dispatches(order_SB, position, loop.dispatch_size)
  sums = epochs.EpochSums()
  desc = f"{phase.name} epoch {epoch + 1}/{phase.config.epochs}"
  with reporting.Progress(phase.steps_per_epoch, desc, batch_size=batch,
                          enabled=distributed.is_main_process()) as progress:
    progress.update(position)
    read = functools.partial(_read_metrics, ctx, loop, epoch, sums, progress)
    in_flight = None
    for i, order_KB in enumerate(batches):
      last = i + 1 == len(batches)
      state, dispatched = _dispatch(loop, state, order_KB, None if last else batches[i + 1],
                                    step, global_step)
      step, global_step = dispatched.step, dispatched.global_step
      if in_flight:  # The one before, read while the device computes this one.
        read(in_flight)
      in_flight = dispatched
      stop = distributed.any_process(ctx.stop.requested)
      if stop or epochs.checkpoint_due(global_step, dispatched.steps,
                                       ctx.config.checkpoint_every_steps, last):
        read(in_flight)
        in_flight = None
        if stop:
          _stop(ctx, phase, state, global_step)
        _save(ctx, phase, state, global_step)
    if in_flight:
      read(in_flight)
  record = _epoch_record(ctx, loop, state, sums, epoch, global_step)
  ctx.metrics.write(record)
  logging.info("%s: loss %.4f accuracy %.4f%s", desc, record["loss"], record["accuracy"],
               "" if record["val_loss"] is None else
               f" val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f}")
  return state, step, global_step, record


def _dispatch(loop: _PhaseLoop, state: steps.TrainState, order_KB, next_KB, step: int,
              global_step: int) -> tuple[steps.TrainState, epochs.InFlight]:
  """Dispatches the steps of the batches ``order_KB`` after phase step ``step`` (global step
  ``global_step``), then reads ahead the next dispatch's ``next_KB`` (None: none)."""
  dispatched = time.perf_counter()
  state, metrics = loop.train_chunk(state, *loop.sources.train.train_batches(order_KB))
  if next_KB is not None:
    loop.sources.train.prefetch(next_KB)
  k = len(order_KB)
  return state, epochs.InFlight(metrics, k, step + k, global_step + k, dispatched)


def _read_metrics(ctx: RunContext, loop: _PhaseLoop, epoch: int, sums: epochs.EpochSums,
                  progress: reporting.Progress, chunk: epochs.InFlight) -> None:
  """Reads a dispatch's metrics from the device: adds them to the epoch's sums and the
  phase's throughput, moves the progress bar, writes the step record, and stops a run whose
  last ``max_bad_steps`` steps were all non-finite."""
  metrics = jax.device_get(chunk.metrics)
  phase, batch = loop.phase, ctx.config.batch_size
  seconds = loop.throughput.add(chunk.dispatched, time.perf_counter(), chunk.steps * batch)
  loss, accuracy = sums.add(metrics, batch)
  progress.update(chunk.steps, loss=loss, accuracy=accuracy)
  ctx.metrics.write({
      "kind": "step", "phase": phase.index, "phase_name": phase.name, "epoch": epoch + 1,
      "step": chunk.global_step, "loss": loss, "accuracy": accuracy,
      "skipped_steps": int((~metrics["finite"]).sum()),
      "learning_rate": float(phase.learning_rate(chunk.step - 1)),
      "images_per_s": chunk.steps * batch / seconds})
  # After the record, which counts them.
  steps.check_bad_steps(int(metrics["bad_steps"][-1]), ctx.config.max_bad_steps, phase.name,
                        chunk.step)


def _epoch_record(ctx: RunContext, loop: _PhaseLoop, state: steps.TrainState,
                  sums: epochs.EpochSums, epoch: int, global_step: int) -> dict[str, Any]:
  """The epoch's training means, its validation loss, accuracy, balanced accuracy and macro
  F1 (None without a validation split), and the phase's throughput so far."""
  validation = dict.fromkeys(("val_loss", "val_accuracy", *selection.CLASS_SCORES))
  if ctx.size("validation"):
    loss, accuracy, predictions, probabilities = dispatch.evaluate_split(
        loop.eval_batch, selection.eval_variables(loop.phase, state), loop.sources.validation,
        ctx.config.eval_batch_size)
    validation = {"val_loss": loss, "val_accuracy": accuracy, **selection.class_scores(
        ctx.splits["validation"].labels, predictions, probabilities.shape[-1])}
  return {"kind": "epoch", "phase": loop.phase.index, "phase_name": loop.phase.name,
          "loss": sums.loss, "accuracy": sums.accuracy(ctx.config.batch_size),
          **validation, "skipped_steps": sums.skipped,
          "images_per_s": loop.throughput.images_per_s, "epoch": epoch + 1, "step": global_step}


# ---------------------------------------------------------------------------------------------
# Phases.
# ---------------------------------------------------------------------------------------------


def train_phase(ctx: RunContext, phase: Phase, state: steps.TrainState,
                global_step: int) -> tuple[steps.TrainState, dict[str, Any]]:
  """Trains ``phase`` from ``state.step`` to its end (or early stop); returns the state it
  hands on (its selected weights) and its results."""
  started = time.perf_counter()
  following = ctx.phases[phase.index + 1:]  # Whose prefix the same pass may cache.
  cut, phase_sources, handed_over = prefix.phase_inputs(
      phase, following[0].cacheable_cut if following else 0,
      {"params": state.params, "batch_stats": state.batch_stats}, ctx.model, ctx.view, ctx.mesh,
      prefix.PhaseSources(ctx.sources["train"], ctx.sources["validation"]), ctx.handoff,
      cache_max_gb=ctx.config.cache_max_gb, batch_size=ctx.config.eval_batch_size)
  if cut and not handed_over:
    _stop_if_requested(ctx, phase, state, global_step)
  class_weights = steps.loss_class_weights(ctx.config.class_weighting,
                                           ctx.splits["train"].labels, ctx.model.num_classes)
  loop = _PhaseLoop(phase, dispatch.make_train_chunk(phase, ctx.model, cut, ctx.view,
                                                     class_weights),
                    dispatch.make_eval_batch(ctx.model, cut, ctx.view, ctx.mesh), phase_sources,
                    epochs.dispatch_size(phase.steps_per_epoch, ctx.config.steps_per_dispatch),
                    epochs.Throughput())
  step, stopped = int(state.step), False
  while step < phase.total_steps:
    state, step, global_step, record = train_epoch(ctx, loop, state, step, global_step)
    stop = selection.track_epoch(ctx.meta, ctx.checkpointer, phase, state, record)
    if stop and step < phase.total_steps:
      stopped = True
      break
    if step < phase.total_steps:  # The phase's last checkpoint is written by run().
      _save(ctx, phase, state, global_step)
      _stop_if_requested(ctx, phase, state, global_step)
  state, weights_from = selection.selected_state(ctx.meta, ctx.checkpointer, phase, state,
                                                 record, stopped)
  return state, outputs.phase_results(
      phase, ctx.model, cut, handed_over, wall_s=time.perf_counter() - started,
      images_per_s=loop.throughput.images_per_s, weights_from=weights_from,
      stopped_after=record["epoch"] if stopped else None)


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains every phase of ``config`` in ``workdir`` (resuming if it holds checkpoints),
  evaluates on the test split, and writes the outputs there. Returns the summary."""
  reporting.setup_logging()
  distributed.initialize(config.distributed)
  if not distributed.is_main_process():
    logging.getLogger().setLevel(logging.WARNING)
  mesh = sharding.data_mesh()
  checks.check_config(config, mesh)
  dataset, splits = load.load_splits(config, pathlib.Path(workdir))
  model = models.create(config.model, dataset.num_classes, mesh.shape[sharding.DATA_AXIS])
  view = transforms.EvalView.from_config(config)
  size = config.model.input_size
  abstract_variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                      jnp.zeros((1, size, size, 3), jnp.float32))
  all_phases = phases.build_phases(config, model, abstract_variables["params"],
                                  len(splits["train"]))
  checks.check_memory(config, model, abstract_variables, mesh)
  fingerprint = checks.config_fingerprint(config, dataset.identity, weights.identity(
      config.model.weights, model, input_size=size, cache_dir=config.model.cache_dir or None))
  workdir = files.make_workdir(workdir)
  with workdir_lock.held(workdir, timeout_s=config.distributed.timeout_s):
    if dataset.split_files and distributed.is_main_process():
      with files.write_errors_reported("writing the split lists to", workdir / "splits"):
        folder.write_split_lists(workdir / "splits", dataset.split_files)
    checkpointer = checkpoint.Checkpointer(workdir, max_to_keep=config.max_to_keep,
                                           timeout_s=config.distributed.timeout_s)
    start = resume.start(checkpointer, fingerprint, config, model, all_phases,
                         abstract_variables, mesh)
    # After the resume checks: a run refused there writes nothing.
    splits, audited = audit.audit_splits(config, workdir, dataset, splits, model, view, mesh)
    if audited and audited["removed_from_train"]:  # Steps per epoch of the smaller train split.
      all_phases = phases.build_phases(config, model, abstract_variables["params"],
                                      len(splits["train"]))
    split_sources = sources.sources(splits, mesh)
    stop = preemption.StopSignal()
    main_process = distributed.is_main_process()
    try:
      events = tensorboard.EventWriter(workdir, enabled=main_process and config.tensorboard)
      with (reporting.MetricsWriter(workdir / "metrics.jsonl", enabled=main_process,
                                    mirrors=[events]) as metrics, stop.installed()):
        ctx = RunContext(config, mesh, model, all_phases, view, splits, split_sources,
                         checkpointer, metrics, stop, start.meta)
        variables = _train_phases(ctx, start)
      checkpointer.wait()  # A failed last checkpoint fails the run before its outputs are written.
      with (files.write_errors_reported("writing the outputs to", workdir),
            preemption.finishing("writing the outputs")):
        return outputs.write_outputs(workdir, config, dataset, splits, model, variables, view,
                                     split_sources["test"], mesh, start.meta["results"],
                                     validation_source=split_sources["validation"],
                                     audited=audited)
    finally:
      checkpointer.close()  # Whatever happened, a checkpoint being written is finished.


def _train_phases(ctx: RunContext, start: resume.Start) -> dict[str, Any]:
  """Trains the phases from ``start`` on; returns the variables the last one hands on."""
  meta, state, variables = ctx.meta, start.state, start.variables
  for phase in ctx.phases[start.phase:]:
    logging.info("phase %d (%s): %d epochs of %d steps, BatchNorm %s\n%s", phase.index,
                 phase.name, phase.config.epochs, phase.steps_per_epoch,
                 phase.config.batchnorm, freezing.format_report(phase.reports))
    if state is None:
      state = jax.jit(lambda v: phases.init_state(phase, v, ctx.config.seed),
                      out_shardings=sharding.replicated(ctx.mesh))(variables)
    global_step = meta["global_step"] + phase.total_steps - int(state.step)
    state, results = train_phase(ctx, phase, state, meta["global_step"])
    meta["results"].append(results)
    _save(ctx, phase, state, global_step)
    _stop_if_requested(ctx, phase, state, global_step)
    variables, state = {"params": state.params, "batch_stats": state.batch_stats}, None
  return variables
