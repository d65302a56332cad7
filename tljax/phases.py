"""A phase: its config turned into what the train step compiles in (freeze labels, masked
optimizer, BatchNorm mode, frozen prefix, augmentation), and its first state."""

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
  learning_rate: Any             # Its schedule, step -> rate (for the records).
  train_bn: frozenset[str]       # BatchNorm layers in batch-statistics mode.
  frozen_until: int              # First layer with a trainable parameter (0: the first).
  steps_per_epoch: int
  augmentation: transforms.Augmentation  # What this phase changes in its training images.

  @property
  def total_steps(self) -> int:
    return self.config.epochs * self.steps_per_epoch

  @property
  def name(self) -> str:
    return self.config.name

  @property
  def cacheable_cut(self) -> int:
    """The first layer the train step could start at, the layers before it computed once
    and cached (0: none): its first trainable layer, where ``cache_prefix`` is "auto" and the
    phase augments nothing. Whether the cache fits is ``prefix.phase_inputs``' call."""
    cacheable = self.config.cache_prefix == "auto" and not self.augmentation.active
    return self.frozen_until if cacheable else 0


def build_phase(config: ml_collections.ConfigDict, index: int, model: LayerStack,
                params: Any, num_train: int) -> Phase:
  """Labels, optimizer, BatchNorm mode and frozen prefix of phase ``index``."""
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
  tx = freezing.masked_optimizer(optim.make_optimizer(phase_config, steps_per_epoch), labels)
  return Phase(index, phase_config, labels, reports, tx,
               optim.learning_rate_schedule(phase_config, steps_per_epoch), train_bn,
               frozen_until, steps_per_epoch, augmentation)


def init_state(phase: Phase, variables: Mapping[str, Any], seed: int) -> steps.TrainState:
  """A phase's first state: given weights, a fresh optimizer state for its own mask."""
  return steps.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=phase.tx.init(variables["params"]),
      rng=jax.random.fold_in(jax.random.PRNGKey(seed), phase.index),
      bad_steps=jnp.zeros((), jnp.int32))


@checks.as_config_error()
def build_phases(config: ml_collections.ConfigDict, model: LayerStack, abstract_params: Any,
                 num_train: int) -> tuple[Phase, ...]:
  """Every phase of ``config``, built once before any work, so that bad freeze rules fail
  first; the parameters' shapes (``abstract_params``) are all a phase depends on."""
  return tuple(build_phase(config, index, model, abstract_params, num_train)
               for index in range(len(config.phases)))
