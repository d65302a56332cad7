"""Pure train and eval steps over an explicit ``TrainState`` pytree.

The model, optimizer and freeze labels are bound with ``functools.partial``; the caller jits.
Gradients are taken with respect to the trainable partition only (the frozen partition is a
closed-over constant), so XLA computes no frozen-parameter gradient and no backward pass
below the lowest trainable layer. On the CPU the layers below it run in inference mode, a few
images at a time (``tljax.models.microbatch``), before the differentiated rest; so does the
gradient where no BatchNorm layer uses batch statistics, summed over the micro-batches.
"""

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
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


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels and optional label smoothing."""
  if not smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: TrainState, inputs: Any, labels: jax.Array, *, model: LayerStack,
               tx: optax.GradientTransformation, param_labels: Any,
               train_bn: frozenset[str], start: int = 0, frozen_until: int = 0,
               image_size: int = 0,
               label_smoothing: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
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
  """
  pixels = image_size**2 or None
  if frozen_until > max(start, 1):
    inputs = microbatch.inference(
        model, {"params": state.params, "batch_stats": state.batch_stats}, inputs,
        pixels=pixels, start=start, stop=frozen_until,
        capture=prefix.frontier(model.layers, frozen_until))
    start = frozen_until
  trainable, frozen = freezing.split(state.params, param_labels)
  batch_size = labels.shape[0]

  def loss_fn(trainable_params, inputs, labels):
    """The loss of these examples' share of the batch's mean, their correct count and the
    updated statistics."""
    variables = {"params": freezing.merge(trainable_params, frozen),
                 "batch_stats": state.batch_stats}
    if train_bn:
      logits, updated = model.apply(variables, inputs, train_bn=train_bn, start=start,
                                    mutable=["batch_stats"])
      stats = {name: updated["batch_stats"][name] for name in train_bn}
    else:
      logits, stats = model.apply(variables, inputs, start=start), {}
    loss = jnp.sum(cross_entropy(logits, labels, label_smoothing)) / batch_size
    return loss, (jnp.sum(jnp.argmax(logits, -1) == labels), stats)

  loss_and_grads = jax.value_and_grad(loss_fn, has_aux=True)
  if train_bn:  # Batch statistics: every example's activations before any is normalised.
    (loss, (correct, stats)), grads = loss_and_grads(trainable, inputs, labels)
  else:  # Each example alone: the batch's gradient is the sum of its micro-batches'.
    (loss, (correct, stats)), grads = microbatch.accumulate(
        lambda part: loss_and_grads(trainable, *part), (inputs, labels),
        shards=model.batch_shards, pixels=pixels)
  finite = jnp.isfinite(loss) & _all_finite(grads)

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
  # taken one reads no old buffers (10% of a fine-tune step on CPU). Frozen leaves stay
  # outside it, untouched.
  new_trainable, new_opt_state, new_stats = jax.lax.cond(finite, update, skip, None)
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
