"""A phase: its config turned into what the train step compiles in (freeze labels, masked
optimizer, BatchNorm mode, frozen-prefix cut, augmentation), and its first state."""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tljax import checks, freezing, optim, prefix, steps
from tljax.data import transforms
from tljax.models.layer_stack import LayerStack


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
  frozen_until: int              # First layer with a trainable parameter (0: the first).
  steps_per_epoch: int
  augmentation: transforms.Augmentation  # What this phase changes in its training images.

  @property
  def total_steps(self) -> int:
    return self.config.epochs * self.steps_per_epoch

  @property
  def name(self) -> str:
    return self.config.name


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
    raise checks.ConfigError(
        f"phases[{index}] ({phase_config.name!r}): the rules {tuple(phase_config.rules)} "
        "freeze every parameter, so the phase would train nothing. Add a rule that trains "
        "something before the rule that freezes the rest, e.g. 'train:predictions/.*', or "
        "remove the phase.")
  bn_layers = {l.name for l in model.layers if l.kind == "bn"}
  train_bn = frozenset(trainable & bn_layers) if phase_config.batchnorm == "batch_stats" \
      else frozenset()
  augmentation = (transforms.Augmentation.from_config(config.data)
                  if phase_config.use_augmentation else transforms.Augmentation())
  frozen_until = prefix.first_trainable_layer(model.layers, trainable)
  frozen_until = frozen_until if frozen_until > 1 else 0
  cut = frozen_until if phase_config.cache_prefix == "auto" and not augmentation.active else 0
  tx = freezing.masked_optimizer(optim.make_optimizer(phase_config, steps_per_epoch), labels)
  return Phase(index, phase_config, labels, reports, tx, train_bn, cut, frozen_until,
               steps_per_epoch, augmentation)


def init_state(phase: Phase, variables: Mapping[str, Any], seed: int) -> steps.TrainState:
  """A phase's first state: given weights, a fresh optimizer state for its own mask."""
  return steps.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=phase.tx.init(variables["params"]),
      rng=jax.random.fold_in(jax.random.PRNGKey(seed), phase.index),
      bad_steps=jnp.zeros((), jnp.int32))


@checks.as_config_error()
def check_phases(config: ml_collections.ConfigDict, model: LayerStack, abstract_params: Any,
                 num_train: int) -> None:
  """Builds every phase once, so that bad freeze rules fail before any work."""
  for index in range(len(config.phases)):
    build_phase(config, index, model, abstract_params, num_train)
