"""A phase's optimizer and learning-rate schedule, from its config."""

from typing import Any, NamedTuple

import jax
import ml_collections
import optax
from optax import tree_utils

from tljax import freezing

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
# Keras's Adam epsilon (optax's default is 1e-8); the tutorial uses Keras defaults.
ADAM_EPSILON = 1e-7


def learning_rate_schedule(phase: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup over ``warmup_epochs``, then constant or cosine decay to 0."""
  if phase.schedule not in SCHEDULES:
    raise ValueError(f"phase {phase.name!r}: schedule={phase.schedule!r} is not one of "
                     f"{SCHEDULES}.")
  total = max(1, phase.epochs * steps_per_epoch)
  warmup = min(total, int(round(phase.warmup_epochs * steps_per_epoch)))
  if phase.schedule == "cosine":
    main = optax.cosine_decay_schedule(phase.learning_rate, max(1, total - warmup))
  else:
    main = optax.constant_schedule(phase.learning_rate)
  if not warmup:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, phase.learning_rate, warmup), main], [warmup])


def make_optimizer(phase: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """The (unmasked) optimizer for a phase's trainable parameters."""
  if phase.optimizer not in OPTIMIZERS:
    raise ValueError(f"phase {phase.name!r}: optimizer={phase.optimizer!r} is not one of "
                     f"{OPTIMIZERS}.")
  if phase.weight_decay and phase.optimizer != "adamw":
    raise ValueError(f"phase {phase.name!r}: weight_decay={phase.weight_decay} needs "
                     "optimizer='adamw'.")
  schedule = learning_rate_schedule(phase, steps_per_epoch)
  if phase.optimizer == "adam":
    tx = optax.adam(schedule, eps=ADAM_EPSILON)
  elif phase.optimizer == "adamw":
    tx = optax.adamw(schedule, eps=ADAM_EPSILON, weight_decay=phase.weight_decay)
  else:
    tx = optax.sgd(schedule, momentum=0.9)
  if phase.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(phase.grad_clip_norm), tx)
  if not 0 <= phase.ema_decay < 1:
    raise ValueError(f"phase {phase.name!r}: ema_decay={phase.ema_decay} must be in [0, 1) "
                     "(0 = off; e.g. 0.999).")
  if phase.ema_decay:
    tx = optax.chain(tx, params_ema(phase.ema_decay))
  return tx


class ParamsEmaState(NamedTuple):
  """The moving average of the parameters the transformation sees."""
  ema_params: Any


def params_ema(decay: float) -> optax.GradientTransformation:
  """Passes updates through; keeps ``ema = decay * ema + (1 - decay) * new_params``.

  Unlike ``optax.ema``, which averages the updates, this averages the parameters, starting
  from their initial values. Chained last, it sees the final updates; inside
  ``freezing.masked_optimizer`` it sees, and holds state for, the trainable parameters only.
  """
  def init(params):
    return ParamsEmaState(jax.tree.map(lambda p: p.copy(), params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("params_ema needs the parameters: call update(updates, state, params).")
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype),
                       state.ema_params, new_params)
    return updates, ParamsEmaState(ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any, params: Any, labels: Any) -> Any:
  """``params`` with each trainable leaf replaced by its moving average in ``opt_state``
  (from a ``freezing.masked_optimizer`` over an optimizer with ``ema_decay``)."""
  averaged = tree_utils.tree_get(opt_state, "ema_params")
  trainable, _ = freezing.split(averaged, labels)
  _, frozen = freezing.split(params, labels)
  return freezing.merge(trainable, frozen)
