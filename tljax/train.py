"""The run: phases of training with checkpoints between and within them, then evaluation.

``run(config, workdir)`` is the whole job: check the config (``checks``), load the data
(``data.load``), build the model (``models``), start from the newest good checkpoint or
the pretrained weights (``resume``), train each phase, write the outputs (``outputs``). A phase
(``phases``) trains for its epochs, dispatching ``steps_per_dispatch`` compiled steps
(``dispatch``) between host syncs, from the images or from its frozen prefix's cache
(``prefix``); it validates each epoch and checkpoints periodically, at epoch ends and at its
end. A restart in the same workdir resumes where the run stopped.
"""

import dataclasses
import logging
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tljax import checkpoint, checks, dispatch, distributed, files, freezing, models, optim
from tljax import outputs, phases, preemption, prefix, reporting, resume, selection, sharding
from tljax import steps, tensorboard
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
  view: transforms.EvalView                           # The evaluation view, built once.
  splits: Mapping[str, dataset.Split]
  sources: Mapping[str, Any]                          # split -> data.sources source
  checkpointer: checkpoint.Checkpointer
  metrics: reporting.MetricsWriter
  stop: Any                                            # preemption.StopSignal
  meta: dict                                           # What checkpoints carry beside state.
  # (phase index, cut) -> (train, validation) prefix caches built by the phase before it.
  handoff: dict[tuple[int, int], tuple[Any, Any]] = dataclasses.field(default_factory=dict)

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


@dataclasses.dataclass
class _Tally:
  """Sums over an epoch's dispatches, and the phase's training throughput."""
  loss_sum: float = 0.0
  correct: int = 0
  finite_steps: int = 0
  skipped: int = 0
  compiled: bool = False    # Whether the phase's first dispatch, mostly compiling, is done.
  train_time: float = 0.0   # Seconds and images of the phase's dispatches after the first.
  train_images: int = 0
  last_done: float = 0.0    # When the host saw the latest dispatch end (time.perf_counter()).

  @property
  def images_per_s(self) -> float | None:
    return self.train_images / self.train_time if self.train_time else None

  def add(self, metrics: Mapping[str, np.ndarray], batch: int) -> tuple[float, float]:
    """Adds one dispatch's per-step metrics (of ``batch`` examples a step); returns its mean
    loss and accuracy."""
    finite = metrics["finite"]
    self.loss_sum += float(np.sum(metrics["loss"][finite]))
    self.correct += int(np.sum(metrics["correct"]))
    self.finite_steps += int(finite.sum())
    self.skipped += int((~finite).sum())
    loss = float(np.mean(metrics["loss"][finite])) if finite.any() else float("nan")
    return loss, float(np.sum(metrics["correct"])) / (metrics["correct"].size * batch)


@dataclasses.dataclass(frozen=True)
class _Compiled:
  """A phase's compiled functions."""
  train_chunk: Any
  eval_batch: Any
  learning_rate: Any
  chunk_size: int


def _chunk_size(total: int, target: int) -> int:
  """The largest divisor of ``total`` in [target/2, target], else ``target``: fewer compiles."""
  target = min(target, total)
  return next((k for k in range(target, max(1, target // 2) - 1, -1) if total % k == 0), target)


@dataclasses.dataclass(frozen=True)
class _InFlight:
  """A dispatched train chunk whose metrics the host has not read yet."""
  metrics: Any          # Per-step metrics, on the device.
  steps: int
  step: int             # The phase step and the global step after it.
  global_step: int
  dispatched: float     # time.perf_counter() at dispatch.


def train_epoch(ctx: RunContext, phase: Phase, fns: _Compiled, state: steps.TrainState,
                step: int, global_step: int, phase_sources, tally: _Tally):
  """Trains the epoch that ``step`` is in, to its end; returns the state, step, global step
  and the epoch's record (validated).

  The host reads each dispatch's metrics (the one host sync) after dispatching the next, so
  the device never waits for the records, the progress bar or a file sync.
  """
  config, batch = ctx.config, ctx.config.batch_size
  epoch, position = divmod(step, phase.steps_per_epoch)
  order = sources.epoch_order(config.seed, phase.index, epoch, ctx.size("train"),
                              phase.steps_per_epoch, batch)
  totals = _Tally()
  desc = f"{phase.name} epoch {epoch + 1}/{phase.config.epochs}"
  with reporting.Progress(phase.steps_per_epoch, desc, batch_size=batch,
                          enabled=distributed.is_main_process()) as progress:
    progress.update(position)

    def read_metrics(chunk: _InFlight) -> None:
      metrics = jax.device_get(chunk.metrics)
      # The chunk ran from its dispatch or the previous chunk's end, whichever came later.
      done = time.perf_counter()
      seconds = done - max(chunk.dispatched, tally.last_done)
      tally.last_done = done
      if tally.compiled:  # The first call's time is mostly compilation.
        tally.train_time += seconds
        tally.train_images += chunk.steps * batch
      tally.compiled = True
      loss, accuracy = totals.add(metrics, batch)
      progress.update(chunk.steps, loss=loss, accuracy=accuracy)
      ctx.metrics.write({
          "kind": "step", "phase": phase.index, "phase_name": phase.name, "epoch": epoch + 1,
          "step": chunk.global_step, "loss": loss, "accuracy": accuracy,
          "skipped_steps": int((~metrics["finite"]).sum()),
          "learning_rate": float(fns.learning_rate(chunk.step - 1)),
          "images_per_s": chunk.steps * batch / seconds})
      # After the record, which counts them.
      _check_bad_steps(int(metrics["bad_steps"][-1]), config, phase, chunk.step)

    in_flight = None
    while position < phase.steps_per_epoch:
      k = min(fns.chunk_size, phase.steps_per_epoch - position)
      dispatched = time.perf_counter()
      state, metrics = fns.train_chunk(state, *phase_sources[0].train_batches(
          order[position:position + k]))
      if position + k < phase.steps_per_epoch:  # Read ahead while the device computes.
        phase_sources[0].prefetch(order[position + k:position + k + fns.chunk_size])
      position, step, global_step = position + k, step + k, global_step + k
      if in_flight:
        read_metrics(in_flight)
      in_flight = _InFlight(metrics, k, step, global_step, dispatched)
      # A checkpoint follows the reading of its own steps' metrics (a non-finite run stops
      # first). Epoch ends are saved by the caller.
      stop = distributed.any_process(ctx.stop.requested)
      every = config.checkpoint_every_steps
      if stop or (every and global_step // every != (global_step - k) // every
                  and position < phase.steps_per_epoch):
        read_metrics(in_flight)
        in_flight = None
        if stop:
          _stop(ctx, phase, state, global_step)
        _save(ctx, phase, state, global_step)
    if in_flight:
      read_metrics(in_flight)
  record = _epoch_record(ctx, phase, fns, state, phase_sources[1], totals, tally)
  record.update(epoch=epoch + 1, step=global_step)
  ctx.metrics.write(record)
  logging.info("%s: loss %.4f accuracy %.4f%s", desc, record["loss"], record["accuracy"],
               "" if record["val_loss"] is None else
               f" val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f}")
  return state, step, global_step, record


def _epoch_record(ctx: RunContext, phase: Phase, fns: _Compiled, state: steps.TrainState,
                  validation, totals: _Tally, tally: _Tally) -> dict[str, Any]:
  """The epoch's training means and its validation loss and accuracy (None without a
  validation split)."""
  val_loss = val_accuracy = None
  if ctx.size("validation"):
    val_loss, val_accuracy, *_ = dispatch.evaluate_split(
        fns.eval_batch, selection.eval_variables(phase, state), validation,
        ctx.config.eval_batch_size)
  steps_run = totals.finite_steps + totals.skipped
  return {"kind": "epoch", "phase": phase.index, "phase_name": phase.name,
          "loss": totals.loss_sum / max(1, totals.finite_steps),
          "accuracy": totals.correct / max(1, steps_run * ctx.config.batch_size),
          "val_loss": val_loss, "val_accuracy": val_accuracy, "skipped_steps": totals.skipped,
          "images_per_s": tally.images_per_s}


def _check_bad_steps(bad: int, config, phase: Phase, step: int) -> None:
  if bad >= config.max_bad_steps:
    raise steps.NonFiniteError(
        f"phase {phase.name}: steps {step - bad + 1}..{step} of the phase all had a "
        f"non-finite loss or gradient (max_bad_steps={config.max_bad_steps}); they were "
        "skipped. Lower the learning rate or check the inputs.")


# ---------------------------------------------------------------------------------------------
# Phases.
# ---------------------------------------------------------------------------------------------


def train_phase(ctx: RunContext, phase: Phase, state: steps.TrainState,
                global_step: int) -> tuple[steps.TrainState, dict[str, Any]]:
  """Trains ``phase`` from ``state.step`` to its end (or early stop); returns the state it
  hands on (its selected weights) and its results."""
  started = time.perf_counter()
  next_cut = 0
  if phase.index + 1 < len(ctx.config.phases):
    next_cut = phases.build_phase(ctx.config, phase.index + 1, ctx.model, state.params,
                                  ctx.size("train")).cut
  phase, phase_sources, handed_over = prefix.phase_inputs(
      phase, next_cut, {"params": state.params, "batch_stats": state.batch_stats}, ctx.model,
      ctx.view, ctx.config, ctx.mesh, (ctx.sources["train"], ctx.sources["validation"]), ctx.handoff)
  if phase.cut and not handed_over:
    _stop_if_requested(ctx, phase, state, global_step)
  fns = _Compiled(dispatch.make_train_chunk(phase, ctx.model, ctx.view),
                  dispatch.make_eval_batch(ctx.model, phase.cut, ctx.view, ctx.mesh),
                  optim.learning_rate_schedule(phase.config, phase.steps_per_epoch),
                  _chunk_size(phase.steps_per_epoch, ctx.config.steps_per_dispatch))
  tally, step, stopped = _Tally(), int(state.step), False
  while step < phase.total_steps:
    state, step, global_step, record = train_epoch(ctx, phase, fns, state, step, global_step,
                                                   phase_sources, tally)
    stop = selection.track_epoch(ctx.meta, ctx.checkpointer, phase, state, record)
    if stop and step < phase.total_steps:
      stopped = True
      break
    if step < phase.total_steps:  # The phase's last checkpoint is written by run().
      _save(ctx, phase, state, global_step)
      _stop_if_requested(ctx, phase, state, global_step)
  state, weights_from = selection.selected_state(ctx.meta, ctx.checkpointer, phase, state,
                                                 record, stopped)
  return state, {
      "name": phase.name, "epochs": phase.config.epochs,
      "wall_s": time.perf_counter() - started, "train_images_per_s": tally.images_per_s,
      "trainable_params": sum(r.size for r in phase.reports if r.rule.action == freezing.TRAIN),
      "frozen_params": sum(r.size for r in phase.reports if r.rule.action == freezing.FREEZE),
      "cached_prefix": list(prefix.frontier(ctx.model.layers, phase.cut)) if phase.cut else None,
      "prefix_cached_by_previous_phase": handed_over, "batchnorm": phase.config.batchnorm,
      "weights_from": weights_from,
      "stopped_early_after_epoch": record["epoch"] if stopped else None}


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
  phases.check_phases(config, model, abstract_variables["params"], len(splits["train"]))
  checks.check_memory(config, model, abstract_variables, mesh)
  fingerprint = checks.config_fingerprint(config, dataset.identity, weights.identity(
      config.model.weights, model, input_size=size, cache_dir=config.model.cache_dir or None))
  workdir = files.make_workdir(workdir)
  if dataset.split_files and distributed.is_main_process():
    with files.write_errors_reported("writing the split lists to", workdir / "splits"):
      folder.write_split_lists(workdir / "splits", dataset.split_files)
  checkpointer = checkpoint.Checkpointer(workdir, max_to_keep=config.max_to_keep)
  start = resume.start(checkpointer, fingerprint, config, model, abstract_variables,
                       len(splits["train"]), mesh)
  split_sources = sources.sources(splits, mesh)
  stop = preemption.StopSignal()
  main_process = distributed.is_main_process()
  try:
    events = tensorboard.EventWriter(workdir, enabled=main_process and config.tensorboard)
    with (reporting.MetricsWriter(workdir / "metrics.jsonl", enabled=main_process,
                                  mirrors=[events]) as metrics, stop.installed()):
      ctx = RunContext(config, mesh, model, view, splits, split_sources, checkpointer, metrics,
                       stop, start.meta)
      variables = _train_phases(ctx, start)
    checkpointer.wait()  # A failed last checkpoint fails the run before its outputs are written.
    with files.write_errors_reported("writing the outputs to", workdir):
      return outputs.write_outputs(workdir, config, dataset, splits, model, variables, view,
                                   split_sources["test"], mesh, start.meta["results"])
  finally:
    checkpointer.close()  # Whatever happened, a checkpoint being written is finished.


def _train_phases(ctx: RunContext, start: resume.Start) -> dict[str, Any]:
  """Trains the phases from ``start`` on; returns the variables the last one hands on."""
  meta, state, variables = ctx.meta, start.state, start.variables
  for index in range(start.phase, len(ctx.config.phases)):
    current = variables if state is None else {"params": state.params}
    phase = phases.build_phase(ctx.config, index, ctx.model, current["params"],
                               ctx.size("train"))
    logging.info("phase %d (%s): %d epochs of %d steps, BatchNorm %s\n%s", index, phase.name,
                 phase.config.epochs, phase.steps_per_epoch, phase.config.batchnorm,
                 freezing.format_report(phase.reports))
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
