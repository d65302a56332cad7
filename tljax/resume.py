"""Where a run starts: the newest checkpoint in its workdir that reads, verifies and matches
the config, in whatever phase it was; else the pretrained weights.

A damaged checkpoint is reported in one line and moved aside, never deleted, and the one before
it is tried; checkpoints of another config (fingerprint) are refused and left untouched.
"""

import dataclasses
import logging
from typing import Any

import jax

from tljax import checkpoint, checks, phases, sharding, steps
from tljax.models import weights


@dataclasses.dataclass
class Start:
  """What the run continues from."""
  meta: dict                          # What checkpoints carry beside the state.
  phase: int                          # The phase to train next.
  state: steps.TrainState | None      # Its restored state, mid-phase; else None, and
  variables: Any | None               # the variables it starts from.


def start(checkpointer: checkpoint.Checkpointer, fingerprint: dict, config, model,
          all_phases: tuple[phases.Phase, ...], abstract_variables, mesh) -> Start:
  """The newest good checkpoint's point in the run (one of ``all_phases``, as
  ``phases.build_phases`` built them), or the beginning with the pretrained weights
  (``config.model.weights``)."""
  restored = _newest_good(checkpointer, fingerprint, all_phases, abstract_variables,
                          config.seed, mesh)
  if restored is None:
    size = config.model.input_size
    variables = sharding.put(weights.load_pretrained(
        config.model.weights, model, input_size=size,
        rng=jax.random.PRNGKey(config.seed), cache_dir=config.model.cache_dir or None),
        sharding.replicated(mesh))
    meta = {"fingerprint": fingerprint, "results": [], "global_step": 0, "phase": 0,
            "phase_step": 0}
    return Start(meta, 0, None, variables)
  latest, meta, phase, state = restored
  logging.info("resuming from checkpoint %d: phase %s, step %d of %d", latest, phase.name,
               meta["phase_step"], phase.total_steps)
  if meta["phase_step"] >= phase.total_steps:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return Start(meta, meta["phase"] + 1, None, variables)
  return Start(meta, meta["phase"], state, None)


def check_phases_fit(meta: dict, all_phases: tuple[phases.Phase, ...], where) -> None:
  """Raises ConfigError where the config's phases no longer hold what checkpoint ``where``
  (with ``meta``) trained already: a finished phase now has another number of epochs, or the
  phase in progress is shorter than the steps it trained."""
  for result, phase in zip(meta["results"], all_phases):
    if result["epochs"] != phase.config.epochs:
      raise checks.ConfigError(
          f"phases[{phase.index}] ({phase.name!r}): epochs={phase.config.epochs}, but this "
          f"phase already finished with epochs={result['epochs']} (checkpoint {where}). Rerun "
          f"with epochs={result['epochs']} to resume, or use a new --workdir to train it with "
          f"{phase.config.epochs}.")
  phase = all_phases[meta["phase"]]
  if meta["phase"] >= len(meta["results"]) and meta["phase_step"] > phase.total_steps:
    trained = -(-meta["phase_step"] // phase.steps_per_epoch)
    raise checks.ConfigError(
        f"phases[{phase.index}] ({phase.name!r}): epochs={phase.config.epochs} makes the phase "
        f"{phase.total_steps} steps long ({phase.steps_per_epoch} an epoch), but checkpoint "
        f"{where} is at its step {meta['phase_step']} ({trained} epochs trained). Rerun with "
        "the epochs and data settings that trained it, or use a new --workdir.")


def _newest_good(checkpointer, fingerprint, all_phases, abstract_variables, seed: int, mesh):
  """``(step, meta, phase, state)`` of the newest checkpoint that reads and verifies, or None
  where there is none. A damaged one is reported in one line and moved aside."""
  tried = []
  for step in checkpointer.all_steps():
    try:
      return step, *_restore(checkpointer, step, fingerprint, all_phases, abstract_variables,
                             seed, mesh)
    except checkpoint.CheckpointDamagedError as e:
      moved = checkpointer.set_aside(step)
      logging.warning("%s; moved it to %s, trying the checkpoint before it", e, moved)
      tried.append(f"{checkpointer.directory / str(step)} (now {moved})")
  if tried:
    raise checkpoint.CheckpointDamagedError(
        f"no checkpoint in {checkpointer.directory} could be restored; tried "
        f"{', '.join(tried)}. Rerunning the same command starts the run from the beginning.")
  return None


def _restore(checkpointer, step, fingerprint, all_phases, abstract_variables, seed: int, mesh):
  """The saved meta, phase and state of checkpoint ``step``, checked against the config (its
  fingerprint, then its phases) before the state is read."""
  meta = checkpointer.restore_meta(step)
  if meta.get("fingerprint") != fingerprint:
    saved = meta.get("fingerprint", {})
    differs = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
    raise checkpoint.CheckpointError(
        f"{checkpointer.directory} holds checkpoints of another config (differs in "
        f"{differs}); they are left untouched. Use another --workdir, or rerun with the "
        "config that wrote them.")
  check_phases_fit(meta, all_phases, checkpointer.directory / str(step))
  phase = all_phases[meta["phase"]]
  abstract_state = jax.eval_shape(lambda v: phases.init_state(phase, v, seed),
                                  abstract_variables)
  abstract_state = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.replicated(mesh)),
      abstract_state)
  return meta, phase, checkpointer.restore_state(step, abstract_state)
