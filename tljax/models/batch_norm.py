"""BatchNorm with Keras's arithmetic and a hand-written gradient for batch statistics.

The forward pass is what Keras computes: the mean, then the variance as the mean squared
deviation from it (two passes, as ``jnp.var``), ``(x - mean) * (rsqrt(var + eps) * scale) +
bias``, and moving averages ``momentum * moving + (1 - momentum) * batch``. Parameters and
statistics are named as in ``flax.linen.BatchNorm`` (``scale``, ``bias``; ``mean``, ``var`` in
``batch_stats``), which is also the Keras weight order.

With batch statistics, the gradient is the closed form

    dx = scale * rsqrt(var + eps) / n * (n * dy - sum(dy) - x_hat * sum(dy * x_hat))

instead of automatic differentiation through the mean, the variance and the normalisation,
which builds several times as many small operations (measured on XLA:CPU in
benchmarks/README.md); the result agrees with automatic differentiation to float32 rounding
(tests/test_batch_norm.py).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def _batch_axes(x: jax.Array) -> tuple[int, ...]:
  """Every axis but the last (the features')."""
  return tuple(range(x.ndim - 1))


def _forward(x, scale, bias, epsilon):
  axes = _batch_axes(x)
  mean = jnp.mean(x, axes)
  centered = x - mean
  var = jnp.mean(centered * centered, axes)
  inv = lax.rsqrt(var + epsilon)
  return (centered * (inv * scale) + bias, mean, var), (centered, inv, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(y, mean, var)``: ``x`` normalised by its own statistics over every axis but the last."""
  return _forward(x, scale, bias, epsilon)[0]


def _forward_rule(x, scale, bias, epsilon):
  return _forward(x.value, scale.value, bias.value, epsilon)


def _backward_rule(epsilon, residuals, cotangents):
  del epsilon
  centered, inv, scale = residuals
  dy, dmean, dvar = cotangents
  n = centered.size // centered.shape[-1]
  normalized = centered * inv
  dbias = jnp.sum(dy, _batch_axes(dy))
  dscale = jnp.sum(dy * normalized, _batch_axes(dy))
  dx = (scale * inv / n) * (n * dy - dbias - normalized * dscale)
  # The statistics feed only the moving averages, so their cotangents are symbolic zeros in
  # training; these terms keep the rule exact for any other use.
  if not isinstance(dmean, SymbolicZero):
    dx = dx + dmean / n
  if not isinstance(dvar, SymbolicZero):
    dx = dx + dvar * 2 * centered / n
  return dx, dscale, dbias


batch_norm_train.defvjp(_forward_rule, _backward_rule, symbolic_zeros=True)


class BatchNorm(nn.Module):
  """Keras ``BatchNormalization`` over the last axis.

  Attributes:
    use_running_average: normalise by the moving statistics (inference) instead of the
      batch's, which also updates the moving statistics.
    momentum, epsilon: as in Keras.
    dtype: the output's dtype; statistics and normalisation are computed in float32.
  """
  use_running_average: bool
  momentum: float
  epsilon: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1],)
    moving_mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
    moving_var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)
    scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
    if self.use_running_average:
      y = (x - moving_mean.value) * (lax.rsqrt(moving_var.value + self.epsilon) * scale) + bias
    else:
      y, mean, var = batch_norm_train(x.astype(jnp.float32), scale, bias, self.epsilon)
      if not self.is_initializing():
        moving_mean.value = self.momentum * moving_mean.value + (1 - self.momentum) * mean
        moving_var.value = self.momentum * moving_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype)
