"""The compiled functions of a phase: K train steps per host call, and batched evaluation.

The steps themselves are the pure functions of ``tljax.steps``; here they are bound to a
phase, jitted with the train state donated, and fed batches gathered on the device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tljax import sharding, steps
from tljax.data import sources, transforms
from tljax.models.layer_stack import CONVOLUTIONS, LayerStack
from tljax.phases import Phase


def scans_steps(model: LayerStack, cut: int) -> bool:
  """Whether ``make_train_chunk`` runs a dispatch's steps as one ``lax.scan``: where the
  step, from layer ``cut`` on, runs no convolution."""
  return not any(layer.kind in CONVOLUTIONS for layer in model.layers[cut:])


def make_train_chunk(phase: Phase, model: LayerStack, cut: int, view: transforms.EvalView,
                     class_weights: np.ndarray | None = None):
  """``(state, inputs, labels, indices[K, B]) -> (state, metrics[K])``: K train steps of
  ``phase`` from layer ``cut`` on (0: from the images; else ``inputs`` are the cache of
  ``layers[:cut]``, as ``prefix.phase_inputs`` returns it), each example's loss weighted by
  its class's ``class_weights`` (None: 1).

  Where the step runs convolutions, each step is one jitted call, dispatched asynchronously;
  the host waits only when the caller fetches the metrics (on XLA:CPU a ``lax.scan`` over such
  a step runs the network slower than the same step called K times: benchmarks/README.md).
  Where it runs none, as when only the head trains on cached pooled features, a call costs
  more than the step, so the K steps run as one ``lax.scan``.
  """
  step = functools.partial(
      steps.train_step, model=model, tx=phase.tx, param_labels=phase.labels,
      train_bn=phase.train_bn, start=cut, frozen_until=phase.frozen_until,
      image_size=view.size, label_smoothing=phase.config.label_smoothing,
      class_weights=class_weights)
  prepare = functools.partial(transforms.model_inputs, cut=cut, view=view,
                              augmentation=phase.augmentation)

  def train_on(state, inputs, labels, batch_indices):
    rng = jax.random.fold_in(state.rng, state.step)
    batch = sources.gather(inputs, batch_indices)
    return step(state, prepare(batch, rng), labels[batch_indices])

  if scans_steps(model, cut):
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


def make_eval_batch(model: LayerStack, cut: int, view: transforms.EvalView, mesh):
  """``(variables, inputs, labels, indices, mask) -> summed metrics and predictions``, from
  layer ``cut`` on (as ``make_train_chunk``).

  The results are replicated, so every process can read them.
  """
  prepare = functools.partial(transforms.model_inputs, cut=cut, view=view,
                              augmentation=transforms.Augmentation())

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def eval_batch(variables, inputs, labels, indices, mask):
    x = prepare(sources.gather(inputs, indices), None)
    return steps.eval_step(variables, x, labels[indices], mask, model=model, start=cut,
                           image_size=view.size)

  return eval_batch


def evaluate_split(eval_batch, variables, source,
                   batch_size: int) -> tuple[float, float, np.ndarray, np.ndarray]:
  """Mean loss, accuracy, every prediction and its class probabilities over the examples of
  ``source`` (a ``data.sources`` source), ``batch_size`` at a time."""
  n = len(source)
  loss_sum, correct, predictions, probabilities = 0.0, 0, [], []
  for inputs, labels, indices, mask in source.eval_batches(batch_size):
    out = eval_batch(variables, inputs, labels, indices, mask)
    loss_sum, correct = loss_sum + out["loss_sum"], correct + out["correct"]
    predictions.append(out["predictions"])
    probabilities.append(out["probabilities"])
  predictions, probabilities = (np.concatenate(jax.device_get(a))[:n]
                                for a in (predictions, probabilities))
  return float(loss_sum) / n, int(correct) / n, predictions, probabilities
