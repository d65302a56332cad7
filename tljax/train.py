"""The run: phases of training with checkpoints between and within them, then evaluation.

``run(config, workdir)`` is the whole job. A phase is built from its config (freeze labels,
masked optimizer, BatchNorm mode, frozen-prefix cut), trains for its epochs, dispatching
``steps_per_dispatch`` steps between host syncs, validates each epoch and checkpoints
periodically, at epoch ends and at its end. A restart in the same workdir resumes from the
latest complete checkpoint, in whatever phase it was.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tljax import checkpoint, data, distributed, evaluate, export, folder, freezing, models
from tljax import optim, plots, preemption, prefix, reporting
from tljax import selection, sharding, steps, tensorboard, weights
from tljax.models.layer_stack import CONVOLUTIONS, LayerStack

BATCHNORM_MODES = ("inference", "batch_stats")
CACHE_MODES = ("auto", "off")
SOURCES = ("auto", "idx", "tfds", "folder")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a process they stopped.


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient, or the test loss is."""


class ConfigError(ValueError):
  """A setting is out of range, contradicts another or cannot work on this machine."""


@dataclasses.dataclass(frozen=True)
class Phase:
  """A phase's compiled-in choices, derived from its config and the model."""
  index: int
  config: ml_collections.ConfigDict
  labels: Any                    # "train"/"freeze" per parameter.
  reports: tuple                 # freezing.RuleReport per rule.
  tx: Any                        # The masked optimizer.
  train_bn: frozenset[str]       # BatchNorm layers in batch-statistics mode.
  cut: int                       # First layer the train step runs (0: from the images).
  steps_per_epoch: int
  augmentation: data.Augmentation  # What this phase changes in its training images.

  @property
  def total_steps(self) -> int:
    return self.config.epochs * self.steps_per_epoch

  @property
  def name(self) -> str:
    return self.config.name


# ---------------------------------------------------------------------------------------------
# Configuration checks: every user mistake fails here, before data, weights or compilation.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _as_config_error():
  """A ValueError raised inside (by the modules that check their own settings) becomes
  ConfigError, with the same message."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e


@_as_config_error()
def check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Raises ConfigError naming the first bad setting and how to fix it."""
  def expect(ok: bool, message: str):
    if not ok:
      raise ConfigError(message)

  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  expect(config.max_to_keep >= 1, f"max_to_keep={config.max_to_keep} must be at least 1: a "
         "restart resumes from the latest checkpoint.")
  expect(config.steps_per_dispatch >= 1,
         f"steps_per_dispatch={config.steps_per_dispatch} must be at least 1.")
  expect(config.data.train_examples >= 0,
         f"data.train_examples={config.data.train_examples} must be >= 0 (0 = all).")
  expect(0 <= config.data.validation_split < 1,
         f"data.validation_split={config.data.validation_split} must be in [0, 1).")
  expect(config.data.scale in data.SCALES,
         f"data.scale={config.data.scale!r} is not one of {tuple(data.SCALES)}.")
  expect(config.data.augment_shift >= 0,
         f"data.augment_shift={config.data.augment_shift} must be >= 0.")
  _check_data_config(config.data, expect)
  backbone = models.backbone(config.model.name)
  backbone.check_config(config.model)
  expect(config.model.dtype in DTYPES,
         f"model.dtype={config.model.dtype!r} is not one of {tuple(DTYPES)}.")
  expect(0 <= config.model.bn_momentum < 1,
         f"model.bn_momentum={config.model.bn_momentum} must be in [0, 1).")
  expect(len(config.phases) >= 1, "config.phases is empty: give at least one phase.")
  for i, phase in enumerate(config.phases):
    where = f"phases[{i}] ({phase.name!r})"
    expect(phase.epochs >= 1, f"{where}: epochs={phase.epochs} must be at least 1.")
    expect(math.isfinite(phase.learning_rate) and phase.learning_rate > 0,
           f"{where}: learning_rate={phase.learning_rate} must be a positive finite number.")
    expect(phase.batchnorm in BATCHNORM_MODES,
           f"{where}: batchnorm={phase.batchnorm!r} is not one of {BATCHNORM_MODES}.")
    expect(phase.cache_prefix in CACHE_MODES,
           f"{where}: cache_prefix={phase.cache_prefix!r} is not one of {CACHE_MODES}.")
    freezing.parse_rules(freezing.expand_presets(phase.rules, backbone.PRESETS))
    optim.make_optimizer(phase, steps_per_epoch=1)
    selection.check(phase, config.data.validation_split > 0, where)


def _check_data_config(data_config, expect) -> None:
  expect(data_config.source in SOURCES,
         f"data.source={data_config.source!r} is not one of {SOURCES}.")
  expect(0 <= data_config.test_split < 1 and
         data_config.validation_split + data_config.test_split < 1,
         f"data.test_split={data_config.test_split} must be in [0, 1) and leave training "
         f"images beside data.validation_split={data_config.validation_split}.")
  low, high = data_config.crop_scale
  expect(0 < low <= high <= 1,
         f"data.crop_scale={tuple(data_config.crop_scale)} must be (low, high) with "
         "0 < low <= high <= 1 (area fractions).")
  low, high = data_config.crop_ratio
  expect(0 < low <= high, f"data.crop_ratio={tuple(data_config.crop_ratio)} must be "
         "(low, high) with 0 < low <= high (width / height).")
  expect(0 < data_config.eval_crop <= 1,
         f"data.eval_crop={data_config.eval_crop} must be in (0, 1] (1 = whole image).")
  expect(data_config.image_size >= 0,
         f"data.image_size={data_config.image_size} must be >= 0 (0 = from input_size).")
  expect(data_config.max_memory_gb > 0,
         f"data.max_memory_gb={data_config.max_memory_gb} must be positive.")


@_as_config_error()
def check_phases(config: ml_collections.ConfigDict, model: LayerStack, abstract_params: Any,
                 num_train: int) -> None:
  """Builds every phase once, so that bad freeze rules fail before any work."""
  for index in range(len(config.phases)):
    build_phase(config, index, model, abstract_params, num_train)


def check_memory(config: ml_collections.ConfigDict, model: LayerStack,
                 abstract_variables: Any, mesh) -> None:
  """Refuses an input size whose training activations cannot fit in a device's memory.

  The estimate (every layer's output for a training batch, as kept for the backward pass)
  is rough, so only a size that clearly cannot work is refused.
  """
  size = config.model.input_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  names = tuple(layer.name for layer in model.layers)
  outputs = jax.eval_shape(lambda v, x: model.apply(v, x, capture=names), abstract_variables, x)
  per_image = sum(math.prod(o.shape) * o.dtype.itemsize for o in jax.tree.leaves(outputs))
  needed = per_image * config.batch_size // mesh.devices.size
  device = mesh.devices.flat[0]
  available = _memory_bytes(device)
  if needed > available:
    fits = int(size * math.sqrt(available / needed))
    raise ConfigError(
        f"model.input_size={size}: a training batch of {config.batch_size} images needs about "
        f"{needed / 2**30:,.0f} GiB of activations per device, more than the "
        f"{available / 2**30:,.1f} GiB of memory of {device.platform} device {device.id}. "
        f"Lower model.input_size (about {fits} fits) or batch_size.")


def _memory_bytes(device) -> int:
  """An accelerator's memory, or the host's physical memory for the CPU."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def config_fingerprint(config: ml_collections.ConfigDict, data_identity: str,
                       weights_identity: str) -> dict[str, Any]:
  """What a checkpoint must agree with to be resumed: the settings that shape the state and
  the data order, the data itself (``data.Dataset.identity``) and the pretrained weights
  (``weights.identity``)."""
  return {"data.name": config.data.name, "data.identity": data_identity,
          "model.weights": weights_identity, "model.name": config.model.name,
          "model.alpha": config.model.alpha,
          "batch_size": config.batch_size, "seed": config.seed,
          "phases": [[p.name, list(p.rules), p.optimizer, p.ema_decay > 0]
                     for p in config.phases]}


# ---------------------------------------------------------------------------------------------
# Phase construction.
# ---------------------------------------------------------------------------------------------


def build_phase(config: ml_collections.ConfigDict, index: int, model: LayerStack,
                params: Any, num_train: int) -> Phase:
  """Labels, optimizer, BatchNorm mode and prefix cut of phase ``index``."""
  phase_config = config.phases[index]
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"the training split has {num_train} examples, fewer than one batch of "
                     f"{config.batch_size}; lower batch_size or raise data.train_examples.")
  rules = freezing.parse_rules(freezing.expand_presets(phase_config.rules, model.PRESETS))
  labels, reports = freezing.label_params(params, rules, model.base_layers)
  trainable = freezing.trainable_layers(labels)
  if not trainable:
    raise ConfigError(
        f"phases[{index}] ({phase_config.name!r}): the rules {tuple(phase_config.rules)} "
        "freeze every parameter, so the phase would train nothing. Add a rule that trains "
        "something before the rule that freezes the rest, e.g. 'train:predictions/.*', or "
        "remove the phase.")
  bn_layers = {l.name for l in model.layers if l.kind == "bn"}
  train_bn = frozenset(trainable & bn_layers) if phase_config.batchnorm == "batch_stats" \
      else frozenset()
  augmentation = (data.Augmentation.from_config(config.data)
                  if phase_config.use_augmentation else data.Augmentation())
  cut = 0
  if phase_config.cache_prefix == "auto" and not augmentation.active:
    cut = prefix.first_trainable_layer(model.layers, trainable)
    cut = cut if cut > 1 else 0
  tx = freezing.masked_optimizer(optim.make_optimizer(phase_config, steps_per_epoch), labels)
  return Phase(index, phase_config, labels, reports, tx, train_bn, cut, steps_per_epoch,
               augmentation)


def init_state(phase: Phase, variables: Mapping[str, Any], seed: int) -> steps.TrainState:
  """A phase's first state: given weights, a fresh optimizer state for its own mask."""
  return steps.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=phase.tx.init(variables["params"]),
      rng=jax.random.fold_in(jax.random.PRNGKey(seed), phase.index),
      bad_steps=jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Inputs: images (preprocessed inside the step) or the cached frozen-prefix frontier.
# ---------------------------------------------------------------------------------------------


def _model_inputs(batch: Mapping[str, jax.Array], rng: jax.Array, *, cut: int, size: int,
                  scale: str, crop_fraction: float, augmentation: data.Augmentation):
  """What the model reads at layer ``cut`` for one gathered batch."""
  if cut:
    return dict(batch)
  if augmentation.active:
    return data.training_input(rng, batch["images"], size=size, scale=scale,
                               crop_fraction=crop_fraction, augmentation=augmentation)
  return data.evaluation_input(batch["images"], size=size, scale=scale,
                               crop_fraction=crop_fraction)


def _index_batches(n: int, batch: int, mesh):
  """Yields ``(indices, valid mask)`` device batches covering ``range(n)``, the last padded."""
  for start in range(0, n, batch):
    indices = np.arange(start, start + batch)
    valid = indices < n
    yield sharding.put((np.where(valid, indices, 0).astype(np.int32), valid),
                       sharding.batch_sharded(mesh))


def _gather(tree, indices):
  return jax.tree.map(lambda a: a[indices], tree)


def build_prefix_caches(variables, inputs: Mapping[str, jax.Array], n: int, *,
                        model: LayerStack, cuts: tuple[int, ...], config,
                        mesh) -> list[dict[str, jax.Array]]:
  """Runs ``layers[:max(cuts)]`` once over ``inputs["images"]``; returns each cut's frontier
  on device."""
  frontiers = [prefix.frontier(model.layers, cut) for cut in cuts]
  names = tuple(dict.fromkeys(name for frontier in frontiers for name in frontier))
  size, scale = config.model.input_size, config.data.scale

  @jax.jit
  def extract(variables, inputs, indices):
    x = data.evaluation_input(inputs["images"][indices], size=size, scale=scale,
                              crop_fraction=config.data.eval_crop)
    return model.apply(variables, x, stop=max(cuts), capture=names)

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def concatenate(chunks):
    return {name: jnp.concatenate([c[name] for c in chunks])[:n] for name in names}

  cache = concatenate([extract(variables, inputs, idx)
                       for idx, _ in _index_batches(n, config.eval_batch_size, mesh)])
  return [{name: cache[name] for name in frontier} for frontier in frontiers]


# ---------------------------------------------------------------------------------------------
# Compiled functions of a phase.
# ---------------------------------------------------------------------------------------------


def scans_steps(phase: Phase, model: LayerStack) -> bool:
  """Whether ``make_train_chunk`` runs a dispatch's steps as one ``lax.scan``: where the
  step runs no convolution."""
  return not any(layer.kind in CONVOLUTIONS for layer in model.layers[phase.cut:])


def make_train_chunk(phase: Phase, model: LayerStack, config, mesh):
  """``(state, inputs, labels, indices[K, B]) -> (state, metrics[K])``: K train steps.

  Where the step runs convolutions, each step is one jitted call, dispatched asynchronously;
  the host waits only when the caller fetches the metrics. (On XLA:CPU a ``lax.scan`` over
  such a step ran the network 3-7x slower than the same step called K times.) Where it runs
  none, as when only the head trains on cached pooled features, a call costs more than the
  step, so the K steps run as one ``lax.scan``.
  """
  del mesh  # The batch is split over devices by the sharding of ``indices``.
  step = functools.partial(
      steps.train_step, model=model, tx=phase.tx, param_labels=phase.labels,
      train_bn=phase.train_bn, start=phase.cut,
      label_smoothing=phase.config.label_smoothing)
  prepare = functools.partial(_model_inputs, cut=phase.cut, size=config.model.input_size,
                              scale=config.data.scale, crop_fraction=config.data.eval_crop,
                              augmentation=phase.augmentation)

  def train_on(state, inputs, labels, batch_indices):
    rng = jax.random.fold_in(state.rng, state.step)
    return step(state, prepare(_gather(inputs, batch_indices), rng), labels[batch_indices])

  if scans_steps(phase, model):
    @functools.partial(jax.jit, donate_argnums=0)
    def scanned_chunk(state, inputs, labels, indices):
      return jax.lax.scan(lambda s, i: train_on(s, inputs, labels, i), state, indices)

    return scanned_chunk

  @functools.partial(jax.jit, donate_argnums=0)
  def one_step(state, inputs, labels, indices, i):
    return train_on(state, inputs, labels, indices[i])

  def chunk(state, inputs, labels, indices):
    metrics = []
    for i in range(indices.shape[0]):
      state, step_metrics = one_step(state, inputs, labels, indices, np.int32(i))
      metrics.append(step_metrics)
    return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)

  return chunk


def make_eval_batch(model: LayerStack, cut: int, config, mesh):
  """``(variables, inputs, labels, indices, mask) -> summed metrics and predictions``.

  The results are replicated, so every process can read them.
  """
  prepare = functools.partial(_model_inputs, cut=cut, size=config.model.input_size,
                              scale=config.data.scale, crop_fraction=config.data.eval_crop,
                              augmentation=data.Augmentation())

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def eval_batch(variables, inputs, labels, indices, mask):
    x = prepare(_gather(inputs, indices), None)
    return steps.eval_step(variables, x, labels[indices], mask, model=model, start=cut)

  return eval_batch


def evaluate_split(eval_batch, variables, inputs, labels: jax.Array, n: int, config,
                   mesh) -> tuple[float, float, np.ndarray, np.ndarray]:
  """Mean loss, accuracy, every prediction and its class probabilities over ``n`` examples."""
  loss_sum, correct, predictions, probabilities = 0.0, 0, [], []
  for indices, mask in _index_batches(n, config.eval_batch_size, mesh):
    out = eval_batch(variables, inputs, labels, indices, mask)
    loss_sum, correct = loss_sum + out["loss_sum"], correct + out["correct"]
    predictions.append(out["predictions"])
    probabilities.append(out["probabilities"])
  predictions, probabilities = (np.concatenate(jax.device_get(a))[:n]
                                for a in (predictions, probabilities))
  return float(loss_sum) / n, int(correct) / n, predictions, probabilities


# ---------------------------------------------------------------------------------------------
# The phase loop.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunContext:
  """What every phase shares: config, mesh, model, data on device, outputs, checkpoints."""
  config: ml_collections.ConfigDict
  mesh: Any
  model: LayerStack
  splits: Mapping[str, data.Split]
  device_images: Mapping[str, Mapping[str, jax.Array]]  # split -> {"images": uint8}
  device_labels: Mapping[str, jax.Array]
  checkpointer: checkpoint.Checkpointer
  metrics: reporting.MetricsWriter
  stop: Any                                            # preemption.StopSignal
  meta: dict                                           # What checkpoints carry beside state.
  # (phase index, cut) -> (train, validation) prefix caches built by the phase before it.
  handoff: dict[tuple[int, int], tuple[Any, Any]] = dataclasses.field(default_factory=dict)


def _save(ctx: RunContext, phase: Phase, state: steps.TrainState, global_step: int) -> None:
  ctx.meta.update(phase=phase.index, phase_step=int(state.step), global_step=global_step)
  ctx.checkpointer.save(global_step, state, ctx.meta)


def _stop_if_requested(ctx: RunContext, phase: Phase, state: steps.TrainState,
                       global_step: int) -> None:
  """After SIGTERM: checkpoints this point (unless saved already), waits, raises Preempted.

  Called between device calls: after each train chunk, the prefix cache, each evaluation
  and each phase, at the same points on every process, which stop together.
  """
  if not distributed.any_process(ctx.stop.requested):
    return
  ctx.checkpointer.wait()
  if ctx.checkpointer.latest_step() != global_step:
    _save(ctx, phase, state, global_step)
    ctx.checkpointer.wait()
  raise preemption.Preempted(f"stopped in phase {phase.name} at step {int(state.step)} of "
                             f"{phase.total_steps}; checkpoint {global_step} is saved",
                             ctx.stop.signum)


def _chunk_sizes(total: int, target: int) -> int:
  """The largest divisor of ``total`` in [target/2, target], else ``target``: fewer compiles."""
  target = min(target, total)
  return next((k for k in range(target, max(1, target // 2) - 1, -1) if total % k == 0), target)


def train_phase(ctx: RunContext, phase: Phase, state: steps.TrainState,
                global_step: int) -> tuple[steps.TrainState, dict[str, Any]]:
  """Trains ``phase`` from ``state.step`` to its end; returns the final state and results."""
  config, mesh, model = ctx.config, ctx.mesh, ctx.model
  started = time.perf_counter()
  n_train, n_val = len(ctx.splits["train"].labels), len(ctx.splits["validation"].labels)
  train_inputs, val_inputs = ctx.device_images["train"], ctx.device_images["validation"]
  phase = _cut_where_cache_fits(ctx, phase, state)
  frontier = prefix.frontier(model.layers, phase.cut) if phase.cut else None
  handed_over = (phase.index, phase.cut) in ctx.handoff
  if handed_over:  # Only phases that cache are handed a cache.
    train_inputs, val_inputs = ctx.handoff.pop((phase.index, phase.cut))
    logging.info("phase %s: using the cache of layers[:%d] (%s) built with the previous "
                 "phase's", phase.name, phase.cut, ", ".join(frontier))
  elif phase.cut:
    following = _following_cut(ctx, phase, state)
    cuts = (phase.cut, following) if following else (phase.cut,)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logging.info("phase %s: caching layers[:%d] (%s)%s for %d examples", phase.name,
                 phase.cut, ", ".join(frontier),
                 f" and, for the next phase, layers[:{following}]" if following else "",
                 n_train + n_val)
    t0 = time.perf_counter()
    caches = [build_prefix_caches(variables, inputs, n, model=model, cuts=cuts,
                                  config=config, mesh=mesh) if n else [inputs] * len(cuts)
              for inputs, n in ((train_inputs, n_train), (val_inputs, n_val))]
    (train_inputs, *train_next), (val_inputs, *val_next) = caches
    if following:
      ctx.handoff[phase.index + 1, following] = (train_next[0], val_next[0])
    jax.block_until_ready(caches)
    logging.info("phase %s: prefix cache built in %.1f s", phase.name, time.perf_counter() - t0)
    _stop_if_requested(ctx, phase, state, global_step)

  chunk_size = _chunk_sizes(phase.steps_per_epoch, config.steps_per_dispatch)
  train_chunk = make_train_chunk(phase, model, config, mesh)
  eval_batch = make_eval_batch(model, phase.cut, config, mesh)
  batch = config.batch_size
  train_time, train_images, compiled = 0.0, 0, False
  learning_rate = optim.learning_rate_schedule(phase.config, phase.steps_per_epoch)
  step, stopped = int(state.step), False
  while step < phase.total_steps:
    epoch, position = divmod(step, phase.steps_per_epoch)
    order = data.epoch_permutation(config.seed, phase.index, epoch, n_train)
    order = np.asarray(order)[:phase.steps_per_epoch * batch].reshape(-1, batch)
    loss_sum, correct, finite_steps, skipped = 0.0, 0, 0, 0
    desc = f"{phase.name} epoch {epoch + 1}/{phase.config.epochs}"
    with reporting.Progress(phase.steps_per_epoch, desc, batch_size=batch,
                            enabled=distributed.is_main_process()) as progress:
      progress.update(position)
      while position < phase.steps_per_epoch:
        k = min(chunk_size, phase.steps_per_epoch - position)
        indices = sharding.put(order[position:position + k], sharding.batch_sharded(mesh, 1))
        t0 = time.perf_counter()
        state, metrics = train_chunk(state, train_inputs, ctx.device_labels["train"], indices)
        metrics = jax.device_get(metrics)
        if compiled:  # The first call's time is mostly compilation.
          train_time += time.perf_counter() - t0
          train_images += k * batch
        compiled = True
        position, step, global_step = position + k, step + k, global_step + k
        finite = metrics["finite"]
        loss_sum += float(np.sum(metrics["loss"][finite]))
        correct += int(np.sum(metrics["correct"]))
        finite_steps += int(finite.sum())
        skipped += int((~finite).sum())
        chunk_loss = float(np.mean(metrics["loss"][finite])) if finite.any() else float("nan")
        chunk_acc = float(np.sum(metrics["correct"])) / (k * batch)
        progress.update(k, loss=chunk_loss, accuracy=chunk_acc)
        ctx.metrics.write({"kind": "step", "phase": phase.index, "phase_name": phase.name,
                           "epoch": epoch + 1, "step": global_step, "loss": chunk_loss,
                           "accuracy": chunk_acc, "skipped_steps": int((~finite).sum()),
                           "learning_rate": float(learning_rate(step - 1)),
                           "images_per_s": k * batch / (time.perf_counter() - t0)})
        _check_bad_steps(state, config, phase, step)  # After the record: it counts the skips.
        _stop_if_requested(ctx, phase, state, global_step)
        every = config.checkpoint_every_steps
        if (every and global_step // every != (global_step - k) // every
            and position < phase.steps_per_epoch):  # Epoch ends are saved below.
          _save(ctx, phase, state, global_step)
    variables = eval_variables(phase, state)
    val_loss = val_acc = None
    if n_val:
      val_loss, val_acc, *_ = evaluate_split(eval_batch, variables, val_inputs,
                                             ctx.device_labels["validation"], n_val, config,
                                             mesh)
    record = {"kind": "epoch", "phase": phase.index, "phase_name": phase.name,
              "epoch": epoch + 1, "step": global_step,
              "loss": loss_sum / max(1, finite_steps),
              "accuracy": correct / max(1, (finite_steps + skipped) * batch),
              "val_loss": val_loss, "val_accuracy": val_acc, "skipped_steps": skipped,
              "images_per_s": train_images / train_time if train_time else None}
    ctx.metrics.write(record)
    logging.info("%s: loss %.4f accuracy %.4f%s", desc, record["loss"], record["accuracy"],
                 f" val_loss {val_loss:.4f} val_accuracy {val_acc:.4f}" if n_val else "")
    if _track_epoch(ctx, phase, variables, record, global_step) and step < phase.total_steps:
      stopped = True
      break
    if step < phase.total_steps:  # The phase's last checkpoint is written by run().
      _save(ctx, phase, state, global_step)
      _stop_if_requested(ctx, phase, state, global_step)
  state, weights_from = _selected_state(ctx, phase, state, record, stopped)
  trainable = sum(r.size for r in phase.reports if r.rule.action == freezing.TRAIN)
  frozen = sum(r.size for r in phase.reports if r.rule.action == freezing.FREEZE)
  results = {"name": phase.name, "epochs": phase.config.epochs,
             "wall_s": time.perf_counter() - started,
             "train_images_per_s": train_images / train_time if train_time else None,
             "trainable_params": trainable, "frozen_params": frozen,
             "cached_prefix": list(frontier) if phase.cut else None,
             "prefix_cached_by_previous_phase": handed_over,
             "batchnorm": phase.config.batchnorm, "weights_from": weights_from,
             "stopped_early_after_epoch": record["epoch"] if stopped else None}
  return state, results


# ---------------------------------------------------------------------------------------------
# The weights a phase evaluates and hands on: EMA, best epoch, early stopping.
# ---------------------------------------------------------------------------------------------


def eval_variables(phase: Phase, state: steps.TrainState) -> dict[str, Any]:
  """What a phase evaluates, saves and hands on: the moving average of its trainable weights
  where ``ema_decay`` is set, else its current weights."""
  params = state.params
  if phase.config.ema_decay:
    params = optim.ema_params(state.opt_state, state.params, phase.labels)
  return {"params": params, "batch_stats": state.batch_stats}


def _track_epoch(ctx: RunContext, phase: Phase, variables, record: Mapping[str, Any],
                 global_step: int) -> bool:
  """Follows the phase's validation metric (kept in the checkpoint meta), saves a new best
  epoch's variables; returns whether to stop the phase early."""
  if not selection.tracks(phase.config):
    return False
  metric = phase.config.select_metric
  tracker = selection.Tracker.from_meta(ctx.meta.get("selection"), phase.index, metric)
  improved = tracker.update(record["epoch"], record[metric], step=global_step)
  ctx.meta["selection"] = tracker.to_meta(phase.index)
  if improved and phase.config.select == "best":
    checkpoint.save_best(ctx.checkpointer.directory.parent, global_step, variables,
                         ctx.meta["selection"])
  stop = tracker.should_stop(phase.config.early_stopping_patience)
  if stop:
    logging.info("phase %s: %s has not improved on epoch %d's %.4f for %d epochs; stopping "
                 "early", phase.name, metric, tracker.best_epoch, tracker.best_value,
                 tracker.epochs_without_improvement)
  return stop


def _selected_state(ctx: RunContext, phase: Phase, state: steps.TrainState,
                    last: Mapping[str, Any], stopped: bool):
  """The state a phase ends with, and where its weights came from: the selected weights in
  place of the trained ones and, stopped early, the phase's last step (a restart then finds
  the phase finished)."""
  variables = eval_variables(phase, state)
  weights_from = {"phase": phase.name, "epoch": last["epoch"], "step": last["step"],
                  "select": phase.config.select, "ema": bool(phase.config.ema_decay)}
  if selection.tracks(phase.config):
    metric = phase.config.select_metric
    weights_from.update(metric=metric, value=last[metric])
    tracker = selection.Tracker.from_meta(ctx.meta.get("selection"), phase.index, metric)
    if phase.config.select == "best" and tracker.best_step not in (None, last["step"]):
      abstract = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), variables)
      variables = checkpoint.restore_best(ctx.checkpointer.directory.parent,
                                          tracker.best_step, abstract)
      weights_from.update(epoch=tracker.best_epoch, step=tracker.best_step,
                          value=tracker.best_value)
      logging.info("phase %s: continuing with epoch %d's weights (%s %.4f)", phase.name,
                   tracker.best_epoch, metric, tracker.best_value)
  step = jnp.full_like(state.step, phase.total_steps) if stopped else state.step
  state = state.replace(step=step, params=variables["params"],
                        batch_stats=variables["batch_stats"])
  return state, weights_from


def _cut_where_cache_fits(ctx: RunContext, phase: Phase, state: steps.TrainState) -> Phase:
  """``phase``, uncached (``cut`` 0) if its prefix cache would exceed ``cache_max_gb``."""
  if not phase.cut:
    return phase
  needed = _cache_bytes(ctx, phase.cut, state)
  if needed > ctx.config.cache_max_gb * 2**30:
    logging.info("phase %s: prefix cache would need %.1f GB > cache_max_gb; not caching",
                 phase.name, needed / 2**30)
    return dataclasses.replace(phase, cut=0)
  return phase


def _following_cut(ctx: RunContext, phase: Phase, state: steps.TrainState) -> int:
  """The next phase's cut if its prefix cache can be built in this phase's pass, else 0.

  It can where the next phase caches ``layers[:c]`` with ``c <= phase.cut``: those layers are
  frozen (and their BatchNorm uses moving statistics) throughout this phase, so they compute
  the same function at the next phase's start. Both caches must fit ``cache_max_gb``.
  """
  index = phase.index + 1
  if index >= len(ctx.config.phases):
    return 0
  cut = build_phase(ctx.config, index, ctx.model, state.params,
                    len(ctx.splits["train"].labels)).cut
  if not 0 < cut <= phase.cut:
    return 0
  together = _cache_bytes(ctx, phase.cut, state) + _cache_bytes(ctx, cut, state)
  return cut if together <= ctx.config.cache_max_gb * 2**30 else 0


def _cache_bytes(ctx: RunContext, cut: int, state: steps.TrainState) -> int:
  """Device bytes of the prefix cache of ``layers[:cut]`` for the train and validation splits."""
  examples = len(ctx.splits["train"].labels) + len(ctx.splits["validation"].labels)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return examples * prefix.bytes_per_example(ctx.model, cut, variables,
                                             ctx.config.model.input_size)


def _check_bad_steps(state, config, phase, step) -> None:
  bad = int(state.bad_steps)
  if bad >= config.max_bad_steps:
    raise NonFiniteError(
        f"phase {phase.name}: steps {step - bad + 1}..{step} of the phase all had a "
        f"non-finite loss or gradient (max_bad_steps={config.max_bad_steps}); they were "
        "skipped. Lower the learning rate or check the inputs.")


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def load_dataset(config, workdir: pathlib.Path | None = None) -> data.Dataset:
  """The dataset ``config.data`` names, from the source it names or detects (``auto``: a
  folder of class folders, else IDX files or a tfds data_dir). A folder's split lists go to
  ``<workdir>/splits``."""
  source, data_dir = config.data.source, config.data.dir
  if source == "auto" and data_dir and folder.is_image_folder(data_dir):
    source = "folder"
  if source == "folder":
    if not data_dir:
      raise data.DataError("data.source=folder needs --config.data.dir=<folder of class "
                           "folders>.")
    return folder.load_folder(config, workdir / "splits" if workdir else None,
                              write_splits=distributed.is_main_process(),
                              progress=distributed.is_main_process())
  if source == "idx":
    return data.load_idx_folder(data_dir, config.data.name)
  if source == "tfds":
    return data.load_tfds(config.data.name, data_dir or None)
  return data.load_dataset(config.data.name, data_dir or None)


def load_splits(config, workdir: pathlib.Path | None = None
                ) -> tuple[data.Dataset, dict[str, data.Split]]:
  """The dataset, and its train / validation / test splits as this config cuts them: a
  folder's own validation split, else Keras's holdout of the last fraction of train.

  Every process loads the whole (in-memory) dataset; process 0 first, so that a download
  or a decoded cache in shared storage is made once.
  """
  with distributed.main_process_first("dataset"):
    dataset = load_dataset(config, workdir)
  train = data.take(dataset.train, config.data.train_examples)
  if dataset.validation is None:
    train, validation = data.holdout_split(train, config.data.validation_split)
  else:
    validation = dataset.validation
  return dataset, {"train": train, "validation": validation, "test": dataset.test}


def create_model(config, num_classes: int) -> LayerStack:
  """The backbone ``config.model`` names, with a ``num_classes`` head."""
  return models.backbone(config.model.name).from_config(
      config.model, num_classes, dtype=DTYPES[config.model.dtype],
      depthwise=config.model.depthwise)


def _restore_newest_good(checkpointer, fingerprint, config, model, abstract_variables,
                         num_train, mesh):
  """``(step, meta, phase, state)`` of the newest checkpoint that reads and verifies, or None
  where there is none. A damaged one is reported in one line and moved aside."""
  tried = []
  for step in checkpointer.all_steps():
    try:
      return step, *_restore(checkpointer, step, fingerprint, config, model,
                             abstract_variables, num_train, mesh)
    except checkpoint.CheckpointDamagedError as e:
      moved = checkpointer.set_aside(step)
      logging.warning("%s; moved it to %s, trying the checkpoint before it", e, moved)
      tried.append(f"{checkpointer.directory / str(step)} (now {moved})")
  if tried:
    raise checkpoint.CheckpointDamagedError(
        f"no checkpoint in {checkpointer.directory} could be restored; tried {', '.join(tried)}. "
        "Rerunning the same command starts the run from the beginning.")
  return None


def _restore(checkpointer, step, fingerprint, config, model, abstract_variables, num_train,
             mesh):
  """The saved meta, phase and state of checkpoint ``step``, checked against the config."""
  meta = checkpointer.restore_meta(step)
  if meta.get("fingerprint") != fingerprint:
    differs = sorted(k for k in fingerprint if meta.get("fingerprint", {}).get(k) != fingerprint[k])
    raise checkpoint.CheckpointError(
        f"{checkpointer.directory} holds checkpoints of another config (differs in "
        f"{differs}); they are left untouched. Use another --workdir, or rerun with the "
        "config that wrote them.")
  phase = build_phase(config, meta["phase"], model, abstract_variables["params"], num_train)
  abstract_state = jax.eval_shape(
      lambda v: init_state(phase, v, config.seed), abstract_variables)
  abstract_state = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.replicated(mesh)),
      abstract_state)
  return meta, phase, checkpointer.restore_state(step, abstract_state)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains every phase of ``config`` in ``workdir`` (resuming if it holds checkpoints),
  evaluates on the test split, and writes the outputs there. Returns the summary."""
  reporting.setup_logging()
  distributed.initialize(config.distributed)
  if not distributed.is_main_process():
    logging.getLogger().setLevel(logging.WARNING)
  workdir = pathlib.Path(workdir)
  mesh = sharding.data_mesh()
  replicated = sharding.replicated(mesh)
  check_config(config, mesh)
  dataset, splits = load_splits(config, workdir)
  model = create_model(config, dataset.num_classes)
  size = config.model.input_size
  sample = jnp.zeros((1, size, size, 3), jnp.float32)
  abstract_variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample)
  check_phases(config, model, abstract_variables["params"], len(splits["train"].labels))
  check_memory(config, model, abstract_variables, mesh)
  fingerprint = config_fingerprint(config, dataset.identity, weights.identity(
      config.model.weights, model, input_size=size, cache_dir=config.model.cache_dir or None))
  workdir = reporting.make_workdir(workdir)
  checkpointer = checkpoint.Checkpointer(workdir, max_to_keep=config.max_to_keep)
  restored = _restore_newest_good(checkpointer, fingerprint, config, model, abstract_variables,
                                  len(splits["train"].labels), mesh)
  state, variables = None, None
  if restored is None:
    meta = {"fingerprint": fingerprint, "results": [], "global_step": 0,
            "phase": 0, "phase_step": 0}
    start_phase = 0
    variables = sharding.put(weights.load_pretrained(
        config.model.weights, model, input_size=size,
        rng=jax.random.PRNGKey(config.seed), cache_dir=config.model.cache_dir or None),
        replicated)
  else:
    latest, meta, phase, state = restored
    logging.info("resuming from checkpoint %d: phase %s, step %d of %d", latest, phase.name,
                 meta["phase_step"], phase.total_steps)
    start_phase = meta["phase"]
    if meta["phase_step"] >= phase.total_steps:
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      state, start_phase = None, start_phase + 1

  device_images = {k: sharding.put({"images": s.images}, replicated) for k, s in splits.items()}
  device_labels = {k: sharding.put(s.labels, replicated) for k, s in splits.items()}
  stop = preemption.StopSignal()
  try:
    events = tensorboard.EventWriter(workdir, enabled=distributed.is_main_process()
                                     and config.tensorboard)
    with (reporting.MetricsWriter(workdir / "metrics.jsonl", enabled=distributed.is_main_process(),
                                  mirrors=[events]) as metrics,
          stop.installed()):
      ctx = RunContext(config, mesh, model, splits, device_images, device_labels,
                       checkpointer, metrics, stop, meta)
      for index in range(start_phase, len(config.phases)):
        current = variables if state is None else {"params": state.params}
        phase = build_phase(config, index, model, current["params"],
                            len(splits["train"].labels))
        logging.info("phase %d (%s): %d epochs of %d steps, BatchNorm %s\n%s", index,
                     phase.name, phase.config.epochs, phase.steps_per_epoch,
                     phase.config.batchnorm, freezing.format_report(phase.reports))
        if state is None:
          state = jax.jit(lambda v: init_state(phase, v, config.seed),
                          out_shardings=replicated)(variables)
        global_step = meta["global_step"] + phase.total_steps - int(state.step)
        state, results = train_phase(ctx, phase, state, meta["global_step"])
        meta["results"].append(results)
        _save(ctx, phase, state, global_step)
        _stop_if_requested(ctx, phase, state, global_step)
        variables, state = {"params": state.params, "batch_stats": state.batch_stats}, None
    checkpointer.wait()  # A failed last checkpoint fails the run before its outputs are written.
    with reporting.write_errors_reported("writing the outputs to", workdir):
      summary = write_outputs(workdir, config, dataset, splits, model, variables,
                              device_images, device_labels, mesh, meta["results"])
  finally:
    checkpointer.close()  # Whatever happened, a checkpoint being written is finished.
  return summary


def write_outputs(workdir, config, dataset, splits, model, variables, device_images,
                  device_labels, mesh, phase_results) -> dict[str, Any]:
  """Test evaluation, then (on process 0) the trained variables, the exported model, confusion
  matrix, sample grid, curves and summary.json."""
  test = splits["test"]
  eval_batch = make_eval_batch(model, 0, config, mesh)
  loss, accuracy, predictions, probabilities = evaluate_split(
      eval_batch, variables, device_images["test"], device_labels["test"], len(test.labels),
      config, mesh)
  if not math.isfinite(loss):
    raise NonFiniteError(f"the test loss is {loss}: the trained model computes non-finite "
                         "values, so no outputs were written. Train again in a new --workdir "
                         "with a lower learning rate, or check the inputs.")
  cm = evaluate.confusion_matrix(test.labels, predictions, dataset.num_classes)
  report = evaluate.classification_report(cm, dataset.class_names, labels=test.labels,
                                          probabilities=probabilities)
  logging.info("test loss %.4f, test accuracy %.4f\n%s", loss, accuracy,
               evaluate.format_classification_report(report))
  summary = {"test_loss": loss, "test_accuracy": accuracy, "test_examples": len(test.labels),
             "image_shape": list(test.images.shape[1:]),
             "weights_from": phase_results[-1]["weights_from"],
             "classification_report": report,
             "dataset": dataset.name, "class_names": list(dataset.class_names),
             "split_sizes": {name: len(split) for name, split in splits.items()},
             "skipped_images": list(dataset.skipped),
             "phases": phase_results, "devices": [str(d) for d in jax.devices()],
             "processes": jax.process_count(),
             "config": json.loads(config.to_json_best_effort())}
  if not distributed.is_main_process():
    return summary
  with reporting.atomic_open(workdir / "trained_variables.msgpack", "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(dict(variables))))
  export.save(workdir / "export", model, variables, config, dataset.class_names,
              test.images.shape[1:])
  np.savez(workdir / "test_predictions.npz", labels=test.labels, predictions=predictions,
           probabilities=probabilities)
  plots.plot_confusion_matrix(cm, dataset.class_names, workdir / "confusion_matrix.png")
  picked = evaluate.pick_samples(test.labels, predictions, n=9, seed=config.seed)
  plots.plot_samples(test.images[picked], test.labels[picked], predictions[picked],
                     dataset.class_names, workdir / "samples.png")
  epochs = [r for r in reporting.read_metrics(workdir / "metrics.jsonl") if r["kind"] == "epoch"]
  plots.plot_curves(epochs, workdir / "curves.png")
  if config.tensorboard:
    with tensorboard.EventWriter(workdir) as events:
      events.add_image("test/confusion_matrix", workdir / "confusion_matrix.png",
                       epochs[-1]["step"] if epochs else 0)
  reporting.write_json(workdir / "summary.json", summary)
  return summary
