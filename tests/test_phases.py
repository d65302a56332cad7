"""tljax.phases: a phase's labels, BatchNorm mode, frozen prefix and augmentation from its
config, and its first state (a fresh optimizer state for its own mask, its own RNG)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helpers import MODEL, override, tiny_config
from tljax import checks, freezing, phases
from tljax.data import transforms

ABSTRACT = jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
LAYERS = [layer.name for layer in MODEL.layers]
NUM_TRAIN = 128  # 8 steps an epoch at tiny_config's batch of 16.


def _phase(index, **overrides):
  config = override(tiny_config("unused"), **overrides)
  return phases.build_phase(config, index, MODEL, ABSTRACT["params"], NUM_TRAIN)


def _trained(phase):
  return {p for p, label in traverse_util.flatten_dict(phase.labels, sep="/").items()
          if label == freezing.TRAIN}


def test_head_phase_trains_the_head_from_the_cached_pooled_features():
  phase = _phase(0)
  assert (phase.index, phase.name, phase.steps_per_epoch, phase.total_steps) == (
      0, "frozen_base", 8, 16)
  assert _trained(phase) == {"predictions/kernel", "predictions/bias"}
  assert LAYERS[phase.frozen_until] == "predictions" and phase.cacheable_cut == 155
  assert phase.train_bn == frozenset() and phase.augmentation == transforms.Augmentation()
  assert [r.size for r in phase.reports][0] == 1280 * 10 + 10
  assert phase.learning_rate(0) == pytest.approx(1e-3)


def test_fine_tune_phase_runs_batch_statistics_in_its_trainable_batchnorms():
  phase = _phase(1)
  assert (phase.name, phase.total_steps) == ("fine_tune", 8)
  assert LAYERS[phase.frozen_until] == "block_11_depthwise" == LAYERS[phase.cacheable_cut]
  assert len(phase.train_bn) == 2 + 5 * 3 + 1  # block_11 from depthwise on, 12-16, Conv_1.
  assert {"block_11_depthwise_BN", "block_16_project_BN", "Conv_1_bn"} <= phase.train_bn
  assert "block_11_expand_BN" not in phase.train_bn
  assert all(name.endswith(("_BN", "_bn")) for name in phase.train_bn)
  assert _phase(1, **{"phases.1.batchnorm": "inference"}).train_bn == frozenset()


@pytest.mark.parametrize("overrides, active, cut", [
    ({}, False, 101),
    ({"data.random_crop": True, "data.flip": True}, True, 0),  # Augmented: nothing cached.
    ({"data.augment_shift": 2, "phases.1.use_augmentation": False}, False, 101),
    ({"phases.1.cache_prefix": "off"}, False, 0),
])
def test_augmentation_and_cache_setting_decide_the_cut(overrides, active, cut):
  phase = _phase(1, **overrides)
  assert phase.augmentation.active == active and phase.cacheable_cut == cut
  assert phase.frozen_until == 101
  if active:
    assert phase.augmentation == transforms.Augmentation(crop_scale=(0.35, 1.0), flip=True)


def test_a_phase_needs_a_batch_and_something_to_train():
  config = tiny_config("unused")
  with pytest.raises(ValueError, match=r"the training split has 15 examples, fewer than one "
                     r"batch of 16; lower batch_size or raise data.train_examples."):
    phases.build_phase(config, 0, MODEL, ABSTRACT["params"], 15)
  with pytest.raises(checks.ConfigError, match=r"fewer than one batch"):  # Before any work.
    phases.build_phases(config, MODEL, ABSTRACT["params"], 15)
  config.phases[1].rules = ("freeze:.*",)
  with pytest.raises(checks.ConfigError, match=r"phases\[1\] \('fine_tune'\): the rules "
                     r"\('freeze:.\*',\) freeze every parameter"):
    phases.build_phases(config, MODEL, ABSTRACT["params"], NUM_TRAIN)


def test_build_phases_builds_each_phase_in_order():
  built = phases.build_phases(tiny_config("unused"), MODEL, ABSTRACT["params"], NUM_TRAIN)
  assert [(p.index, p.name, p.frozen_until) for p in built] == [
      (0, "frozen_base", 155), (1, "fine_tune", 101)]


def test_init_state_is_fresh_for_the_phases_own_mask():
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), ABSTRACT)
  built = [_phase(0), _phase(1)]
  states = [phases.init_state(phase, variables, seed=7) for phase in built]
  for index, state in enumerate(states):
    assert state.params is variables["params"]
    assert state.batch_stats is variables["batch_stats"]
    assert (int(state.step), int(state.bad_steps)) == (0, 0)
    assert state.step.dtype == state.bad_steps.dtype == jnp.int32
    np.testing.assert_array_equal(
        jax.random.key_data(state.rng) if jnp.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
        else state.rng, jax.random.fold_in(jax.random.PRNGKey(7), index))
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(state.opt_state))  # Fresh.
  assert not np.array_equal(states[0].rng, states[1].rng)
  # Adam's moments exist for the phase's trainable parameters only: its own mask.
  for state, phase in zip(states, built):
    adam = state.opt_state.inner_states["train"].inner_state[0]
    moments = {"/".join(k.key for k in path)
               for path, _ in jax.tree_util.tree_leaves_with_path(adam.mu)}
    assert moments == _trained(phase)
  assert len(jax.tree.leaves(states[0].opt_state)) == 6  # Two counts, mu and nu of 2 arrays.
