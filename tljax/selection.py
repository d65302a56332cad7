"""Which epoch's weights a phase hands on: the last, or the best by a validation metric; and
when validation has stopped improving for long enough to stop the phase early.

The tracker is plain data, saved in every checkpoint's meta, so a resumed phase knows its
best epoch so far and how long ago it was.
"""

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tljax import checkpoint, evaluate, optim

SELECT_MODES = ("last", "best")
# Validation metric -> +1 when higher is better, -1 when lower is.
METRICS = {"val_accuracy": 1, "val_loss": -1, "val_balanced_accuracy": 1, "val_macro_f1": 1}
# The metrics that weigh every class alike, from the validation predictions (class_scores).
CLASS_SCORES = ("val_balanced_accuracy", "val_macro_f1")


def class_scores(labels, predictions, num_classes: int) -> dict[str, float]:
  """The validation split's balanced accuracy (the mean recall of the classes it holds) and
  macro F1 (the mean F1 over every class), as an epoch record holds them."""
  report = evaluate.classification_report(
      evaluate.confusion_matrix(labels, predictions, num_classes), range(num_classes))
  return {"val_balanced_accuracy": evaluate.balanced_accuracy(report),
          "val_macro_f1": report["macro_avg"]["f1"]}


def check(phase: ml_collections.ConfigDict, has_validation: bool, where: str) -> None:
  """Raises ValueError naming a bad ``select``, ``select_metric`` or patience setting."""
  if phase.select not in SELECT_MODES:
    raise ValueError(f"{where}: select={phase.select!r} is not one of {SELECT_MODES}.")
  if phase.select_metric not in METRICS:
    raise ValueError(f"{where}: select_metric={phase.select_metric!r} is not one of "
                     f"{tuple(METRICS)}.")
  if phase.early_stopping_patience < 0:
    raise ValueError(f"{where}: early_stopping_patience={phase.early_stopping_patience} must "
                     "be >= 0 epochs (0 = off).")
  if tracks(phase) and not has_validation:
    raise ValueError(f"{where}: select='best' and early stopping read the validation split, "
                     "but data.validation_split is 0; set it above 0 (e.g. 0.1), or use "
                     "select='last' and early_stopping_patience=0.")


def tracks(phase: ml_collections.ConfigDict) -> bool:
  """Whether ``phase`` needs its validation metric followed epoch by epoch."""
  return phase.select == "best" or phase.early_stopping_patience > 0


@dataclasses.dataclass
class Tracker:
  """The best value of a validation metric in a phase so far, and where it was reached.

  >>> t = Tracker("val_loss")
  >>> [t.update(epoch, loss, step=10 * epoch) for epoch, loss in [(1, 0.5), (2, 0.7)]]
  [True, False]
  >>> t.best_epoch, t.epochs_without_improvement
  (1, 1)
  """
  metric: str
  best_value: float | None = None
  best_epoch: int | None = None        # 1-based epoch of the phase.
  best_step: int | None = None         # Global step at the end of that epoch.
  epochs_without_improvement: int = 0

  def update(self, epoch: int, value: float, *, step: int) -> bool:
    """Records one epoch's metric; returns whether it is a new best (ties are not)."""
    sign = METRICS[self.metric]
    improved = not math.isnan(value) and (
        self.best_value is None or sign * value > sign * self.best_value)
    if improved:
      self.best_value, self.best_epoch, self.best_step = float(value), epoch, step
      self.epochs_without_improvement = 0
    else:
      self.epochs_without_improvement += 1
    return improved

  def should_stop(self, patience: int) -> bool:
    """Whether ``patience`` (> 0) epochs in a row have not improved on the best."""
    return patience > 0 and self.epochs_without_improvement >= patience

  def to_meta(self, phase_index: int) -> dict[str, Any]:
    return {"phase": phase_index, **dataclasses.asdict(self)}

  @classmethod
  def from_meta(cls, meta: dict[str, Any] | None, phase_index: int, metric: str) -> "Tracker":
    """The tracker saved for ``phase_index``, or a fresh one."""
    if not meta or meta["phase"] != phase_index:
      return cls(metric)
    return cls(**{k: v for k, v in meta.items() if k != "phase"})


# ---------------------------------------------------------------------------------------------
# Applied to a phase of a run (``phase`` a ``phases.Phase``, ``state`` a ``steps.TrainState``).
# ---------------------------------------------------------------------------------------------


def eval_variables(phase, state) -> dict[str, Any]:
  """What a phase evaluates, saves and hands on: the moving average of its trainable weights
  where ``ema_decay`` is set, else its current weights."""
  params = state.params
  if phase.config.ema_decay:
    params = optim.ema_params(state.opt_state, state.params, phase.labels)
  return {"params": params, "batch_stats": state.batch_stats}


def track_epoch(meta: dict, checkpointer: checkpoint.Checkpointer, phase, state,
                record: Mapping[str, Any]) -> bool:
  """Follows the phase's validation metric (kept in the checkpoint ``meta``), saves a new best
  epoch's variables; returns whether to stop the phase early."""
  if not tracks(phase.config):
    return False
  metric = phase.config.select_metric
  tracker = Tracker.from_meta(meta.get("selection"), phase.index, metric)
  improved = tracker.update(record["epoch"], record[metric], step=record["step"])
  meta["selection"] = tracker.to_meta(phase.index)
  if improved and phase.config.select == "best":
    checkpoint.save_best(checkpointer.directory.parent, record["step"],
                         eval_variables(phase, state), meta["selection"])
  stop = tracker.should_stop(phase.config.early_stopping_patience)
  if stop:
    logging.info("phase %s: %s has not improved on epoch %d's %.4f for %d epochs; stopping "
                 "early", phase.name, metric, tracker.best_epoch, tracker.best_value,
                 tracker.epochs_without_improvement)
  return stop


def selected_state(meta: dict, checkpointer: checkpoint.Checkpointer, phase, state,
                   last: Mapping[str, Any], stopped: bool):
  """The state a phase ends with, and where its weights came from: the selected weights in
  place of the trained ones and, stopped early, the phase's last step (a restart then finds
  the phase finished)."""
  variables = eval_variables(phase, state)
  weights_from = {"phase": phase.name, "epoch": last["epoch"], "step": last["step"],
                  "select": phase.config.select, "ema": bool(phase.config.ema_decay)}
  if tracks(phase.config):
    metric = phase.config.select_metric
    weights_from.update(metric=metric, value=last[metric])
    tracker = Tracker.from_meta(meta.get("selection"), phase.index, metric)
    if phase.config.select == "best" and tracker.best_step not in (None, last["step"]):
      abstract = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), variables)
      try:
        variables = checkpoint.restore_best(checkpointer.directory.parent,
                                            tracker.best_step, abstract)
      except checkpoint.CheckpointDamagedError as e:
        logging.warning("%s; phase %s continues with its last epoch's weights instead",
                        e, phase.name)
      else:
        weights_from.update(epoch=tracker.best_epoch, step=tracker.best_step,
                            value=tracker.best_value)
        logging.info("phase %s: continuing with epoch %d's weights (%s %.4f)", phase.name,
                     tracker.best_epoch, metric, tracker.best_value)
  step = jnp.full_like(state.step, phase.total_steps) if stopped else state.step
  state = state.replace(step=step, params=variables["params"],
                        batch_stats=variables["batch_stats"])
  return state, weights_from
