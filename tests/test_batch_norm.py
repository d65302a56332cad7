"""Tests of tljax.models.batch_norm against flax.linen.BatchNorm with two-pass variance (the
arithmetic Keras uses) and automatic differentiation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.models.batch_norm import BatchNorm, batch_norm_train

EPSILON, MOMENTUM = 1e-3, 0.9
TOLERANCE = 1e-5  # Relative to the largest magnitude of each compared array.


def _variables(features, seed=0):
  rng = np.random.default_rng(seed)
  return {"params": {"scale": rng.standard_normal(features, np.float32),
                     "bias": rng.standard_normal(features, np.float32)},
          "batch_stats": {"mean": rng.standard_normal(features, np.float32),
                          "var": rng.uniform(0.5, 2.0, features).astype(np.float32)}}


def _inputs(shape, seed=1):
  rng = np.random.default_rng(seed)
  # An offset mean, as after a convolution, so that the two-pass variance matters.
  return (3 * rng.standard_normal(shape) + 1).astype(np.float32), \
      rng.standard_normal(shape).astype(np.float32)


def _reference(use_running_average):
  return nn.BatchNorm(use_running_average=use_running_average, momentum=MOMENTUM,
                      epsilon=EPSILON, use_fast_variance=False)


def _loss_and_grads(module, variables, x, weights):
  """A nonlinear loss of the output, its gradients w.r.t. params and input, new statistics."""
  def loss(params, x):
    y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * weights), updates["batch_stats"]
  (value, stats), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x)
  return value, grads, stats


def _assert_close(actual, expected):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=0, atol=TOLERANCE * float(np.max(np.abs(e))))


@pytest.mark.parametrize("shape", [(32, 2, 2, 6), (32, 1, 1, 5), (4, 7, 5, 3)])
def test_batch_statistics_step_matches_flax_autodiff(shape):
  variables = _variables(shape[-1])
  x, weights = _inputs(shape)
  ours = _loss_and_grads(BatchNorm(False, MOMENTUM, EPSILON), variables, x, weights)
  expected = _loss_and_grads(_reference(False), variables, x, weights)
  _assert_close(ours, expected)
  assert set(ours[2]) == {"mean", "var"}


def test_moving_statistics_output_is_flax_bit_for_bit():
  variables = _variables(6)
  x, _ = _inputs((3, 4, 4, 6))
  ours = BatchNorm(True, MOMENTUM, EPSILON).apply(variables, x)
  expected = _reference(True).apply(variables, x)
  np.testing.assert_array_equal(ours, expected)


def test_variables_are_named_and_initialised_as_flax():
  x = jnp.zeros((2, 3, 3, 4))
  ours = BatchNorm(False, MOMENTUM, EPSILON).init(jax.random.PRNGKey(0), x)
  expected = _reference(False).init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, e)
    assert a.dtype == e.dtype == jnp.float32


def test_gradients_through_the_statistics_match_autodiff():
  """The rule's terms for the mean and variance cotangents, unused in training."""
  rng = np.random.default_rng(2)
  x, weights = _inputs((8, 2, 2, 3))
  scale, bias = rng.standard_normal(3, np.float32), rng.standard_normal(3, np.float32)

  def autodiff(x, scale, bias):
    axes = (0, 1, 2)
    mean = jnp.mean(x, axes)
    var = jnp.mean((x - mean) ** 2, axes)
    return (x - mean) * (jax.lax.rsqrt(var + EPSILON) * scale) + bias, mean, var

  def loss(f):
    def total(x, scale, bias):
      y, mean, var = f(x, scale, bias)
      return jnp.sum(jnp.sin(y) * weights) + jnp.sum(mean ** 3) + jnp.sum(jnp.cos(var))
    return jax.grad(total, argnums=(0, 1, 2))(x, scale, bias)

  _assert_close(loss(lambda *a: batch_norm_train(*a, EPSILON)), loss(autodiff))


def test_compute_dtype_sets_the_output_dtype_only():
  variables = _variables(4)
  x, _ = _inputs((8, 2, 2, 4))
  for train in (False, True):
    y, updates = BatchNorm(not train, MOMENTUM, EPSILON, dtype=jnp.bfloat16).apply(
        variables, x.astype(jnp.bfloat16), mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(updates))
