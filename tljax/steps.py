"""Pure train and eval steps over an explicit ``TrainState`` pytree.

The model, optimizer and freeze labels are bound with ``functools.partial``; the caller jits.
Gradients are taken with respect to the trainable partition only (the frozen partition is a
closed-over constant), so XLA computes no frozen-parameter gradient and no backward pass
below the lowest trainable layer. On the CPU the layers below it run in inference mode, a few
images at a time (``tljax.models.microbatch``), before the differentiated rest; so does the
gradient where no BatchNorm layer uses batch statistics, summed over the micro-batches.
"""

import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tljax import freezing, prefix
from tljax.models import microbatch
from tljax.models.layer_stack import LayerStack


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient, or the test loss is."""

Batch = Mapping[str, Any]


@flax.struct.dataclass
class TrainState:
  """Everything a phase's training changes, as one pytree (what a checkpoint holds)."""
  step: jax.Array            # Steps taken in the current phase.
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array             # Base key; step keys are fold_in(rng, step).
  bad_steps: jax.Array       # Consecutive non-finite steps (skipped) so far.


def check_bad_steps(bad: int, max_bad_steps: int, phase_name: str, step: int) -> None:
  """Raises NonFiniteError where the ``bad`` steps up to ``step`` (consecutive, non-finite,
  skipped) of phase ``phase_name`` reach ``max_bad_steps``."""
  if bad >= max_bad_steps:
    raise NonFiniteError(
        f"phase {phase_name}: steps {step - bad + 1}..{step} of the phase all had a "
        f"non-finite loss or gradient (max_bad_steps={max_bad_steps}); they were "
        "skipped. Lower the learning rate or check the inputs.")


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels and optional label smoothing."""
  if not smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets)


CLASS_WEIGHTING = ("none", "balanced")


def balanced_class_weights(labels, num_classes: int) -> np.ndarray:
  """Loss weights inverse to each class's frequency in ``labels``, normalised so that their
  mean over the examples is 1 (a class without examples weighs 0).

  >>> [round(float(w), 3) for w in balanced_class_weights([0, 0, 0, 1], 2)]
  [0.667, 2.0]
  """
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
  present = np.count_nonzero(counts)
  weights = np.divide(len(labels), present * counts, out=np.zeros(num_classes),
                      where=counts > 0)
  return weights.astype(np.float32)


def loss_class_weights(class_weighting: str, labels, num_classes: int) -> np.ndarray | None:
  """The ``class_weights`` of ``train_step`` for a ``class_weighting`` setting (None: none)."""
  if class_weighting not in CLASS_WEIGHTING:
    raise ValueError(f"class_weighting={class_weighting!r} is not one of {CLASS_WEIGHTING}.")
  return balanced_class_weights(labels, num_classes) if class_weighting == "balanced" else None


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: TrainState, inputs: Any, labels: jax.Array, *, model: LayerStack,
               tx: optax.GradientTransformation, param_labels: Any,
               train_bn: frozenset[str], start: int = 0, frozen_until: int = 0,
               image_size: int = 0, label_smoothing: float = 0.0,
               class_weights: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a batch; a non-finite loss or gradient leaves the state unchanged.

  Args:
    state: the current train state.
    inputs: images ``[B, H, W, 3]`` (``start == 0``) or the cached tensors ``model`` reads
      at layer ``start``.
    labels: ``[B]`` integer classes.
    model, tx, param_labels: the network, the masked optimizer, the freeze labels.
    train_bn: BatchNorm layers that use batch statistics (see ``LayerStack``).
    frozen_until: the first layer with a trainable parameter; where it is past ``start``,
      the layers before it run first, in micro-batches (``tljax.models.microbatch``).
    image_size: the model's input side, which sets the micro-batches' size (0: the maps in
      ``inputs``).
    class_weights: ``[classes]`` weights of each example's loss by its label (None: 1).
  """
  pixels = image_size**2 or None
  if frozen_until > max(start, 1):
    inputs = _frozen_prefix(state, inputs, model, start, frozen_until, pixels)
    start = frozen_until
  trainable, frozen = freezing.split(state.params, param_labels)
  loss_fn = functools.partial(
      _loss, frozen=frozen, batch_stats=state.batch_stats, model=model, train_bn=train_bn,
      start=start, label_smoothing=label_smoothing, batch_size=labels.shape[0],
      class_weights=class_weights)
  (loss, (correct, stats)), grads = _loss_and_grads(
      loss_fn, trainable, inputs, labels, model=model, whole_batch=bool(train_bn),
      pixels=pixels)
  finite = jnp.isfinite(loss) & _all_finite(grads)
  new_trainable, new_opt_state, new_stats = _masked_update(
      state, finite, grads, trainable, frozen, stats, tx=tx, param_labels=param_labels,
      train_bn=train_bn)
  new_state = state.replace(
      step=state.step + 1,
      params=freezing.merge(new_trainable, frozen),
      batch_stats={**state.batch_stats, **new_stats},
      opt_state=new_opt_state,
      bad_steps=jnp.where(finite, 0, state.bad_steps + 1))
  # The bad-step count rides along: the host reads a dispatch's metrics after the next
  # dispatch has taken over (donated) the state.
  metrics = {"loss": loss, "correct": correct,
             "finite": finite, "bad_steps": new_state.bad_steps}
  return new_state, metrics


def _frozen_prefix(state: TrainState, inputs: Any, model: LayerStack, start: int, stop: int,
                   pixels: int | None) -> dict[str, jax.Array]:
  """What ``layers[stop:]`` read of ``layers[start:stop]``, frozen, run on ``inputs`` in
  inference mode and in micro-batches."""
  return microbatch.inference(
      model, {"params": state.params, "batch_stats": state.batch_stats}, inputs,
      pixels=pixels, start=start, stop=stop, capture=prefix.frontier(model.layers, stop))


def _loss(trainable: Any, inputs: Any, labels: jax.Array, *, frozen: Any, batch_stats: Any,
          model: LayerStack, train_bn: frozenset[str], start: int, label_smoothing: float,
          batch_size: int,
          class_weights: Any) -> tuple[jax.Array, tuple[jax.Array, dict[str, Any]]]:
  """The loss of these examples' share of the batch's mean (of ``batch_size``; each example's
  weighted by its class's ``class_weights``, None: 1), their correct count and the updated
  statistics of the ``train_bn`` layers."""
  variables = {"params": freezing.merge(trainable, frozen), "batch_stats": batch_stats}
  if train_bn:
    logits, updated = model.apply(variables, inputs, train_bn=train_bn, start=start,
                                  mutable=["batch_stats"])
    stats = {name: updated["batch_stats"][name] for name in train_bn}
  else:
    logits, stats = model.apply(variables, inputs, start=start), {}
  losses = cross_entropy(logits, labels, label_smoothing)
  if class_weights is not None:
    losses = losses * jnp.asarray(class_weights)[labels]
  loss = jnp.sum(losses) / batch_size
  return loss, (jnp.sum(jnp.argmax(logits, -1) == labels), stats)


def _loss_and_grads(loss_fn, trainable: Any, inputs: Any, labels: jax.Array, *,
                    model: LayerStack, whole_batch: bool, pixels: int | None):
  """``((loss, aux), grads)`` of ``loss_fn`` over the batch, with respect to ``trainable``:
  at once where ``whole_batch`` (batch statistics: every example's activations before any is
  normalised), else summed over micro-batches (each example alone)."""
  loss_and_grads = jax.value_and_grad(loss_fn, has_aux=True)
  if whole_batch:
    return loss_and_grads(trainable, inputs, labels)
  return microbatch.accumulate(lambda part: loss_and_grads(trainable, *part), (inputs, labels),
                               shards=model.batch_shards, pixels=pixels)


def _masked_update(state: TrainState, finite: jax.Array, grads: Any, trainable: Any,
                   frozen: Any, stats: dict[str, Any], *, tx: optax.GradientTransformation,
                   param_labels: Any, train_bn: frozenset[str]):
  """``(trainable, opt_state, train_bn statistics)`` after the update with ``grads`` and the
  step's ``stats`` where ``finite``, else as they were in ``state``."""

  def update(_):
    # multi_transform wants a full-structure tree; the frozen zeros are discarded by
    # set_to_zero, and XLA removes them.
    full_grads = freezing.merge(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, new_opt_state = tx.update(full_grads, state.opt_state, state.params)
    trainable_updates, _ = freezing.split(updates, param_labels)
    return optax.apply_updates(trainable, trainable_updates), new_opt_state, stats

  def skip(_):
    return trainable, state.opt_state, {name: state.batch_stats[name] for name in train_bn}

  # A conditional, not a select over the whole state: a skipped step costs nothing, and a
  # taken one reads no old buffers (measured in benchmarks/README.md). Frozen leaves stay
  # outside it, untouched.
  return jax.lax.cond(finite, update, skip, None)


def eval_step(variables: Any, inputs: Any, labels: jax.Array, mask: jax.Array, *,
              model: LayerStack, start: int = 0, image_size: int = 0) -> dict[str, jax.Array]:
  """Summed loss and correct count over the unmasked examples, and every prediction with its
  class probabilities (the model run in micro-batches, as in ``train_step``)."""
  logits = microbatch.inference(model, variables, inputs, pixels=image_size**2 or None,
                                start=start)
  losses = cross_entropy(logits, labels)
  predictions = jnp.argmax(logits, -1)
  return {"loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
          "correct": jnp.sum(jnp.where(mask, predictions == labels, False)),
          "predictions": predictions,
          "probabilities": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)}
