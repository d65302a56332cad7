"""A phase's optimizer and learning-rate schedule, from its config."""

import ml_collections
import optax

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
  return tx
