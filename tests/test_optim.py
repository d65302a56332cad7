"""Tests of tljax.optim: the moving average of the trainable weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from tljax import freezing, optim

PARAMS = {"head": {"kernel": jnp.ones((2, 3))}, "base": {"kernel": jnp.full((3,), 2.0)}}
LABELS = {"head": {"kernel": freezing.TRAIN}, "base": {"kernel": freezing.FREEZE}}


def test_ema_averages_trainable_weights_only():
  phase = default.phase(optimizer="sgd", learning_rate=0.1, ema_decay=0.5)
  tx = freezing.masked_optimizer(optim.make_optimizer(phase, steps_per_epoch=1), LABELS)
  params, opt_state = PARAMS, tx.init(PARAMS)
  averages = tuple(optax.tree_utils.tree_get_all_with_path(opt_state, "ema_params"))
  assert len(averages) == 1
  assert len(jax.tree.leaves(averages[0][1])) == 1  # The frozen kernel holds no average.
  expected_ema = np.ones((2, 3))
  grads = {"head": {"kernel": jnp.full((2, 3), 1.0)}, "base": {"kernel": jnp.ones(3)}}
  for _ in range(2):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    expected_ema = 0.5 * expected_ema + 0.5 * np.asarray(params["head"]["kernel"])
  evaluated = optim.ema_params(opt_state, params, LABELS)
  np.testing.assert_allclose(evaluated["head"]["kernel"], expected_ema, rtol=1e-6)
  assert not np.allclose(evaluated["head"]["kernel"], params["head"]["kernel"])
  assert evaluated["base"]["kernel"] is params["base"]["kernel"]
  np.testing.assert_array_equal(params["base"]["kernel"], PARAMS["base"]["kernel"])


def test_ema_decay_out_of_range_is_refused():
  with pytest.raises(ValueError, match=r"ema_decay=1.0 must be in \[0, 1\)"):
    optim.make_optimizer(default.phase(ema_decay=1.0), steps_per_epoch=1)
