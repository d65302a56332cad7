"""Per-example work a few images at a time: on the CPU, it runs faster in micro-batches.

Over a whole batch each layer writes its output to memory and the next layer reads it back
(block_1's expanded map alone is tens of megabytes at batch 32, 160x160). A few images at a
time, a layer's output is still in the cache when the next layer reads it, and the base's
forward pass runs markedly faster (measured in benchmarks/README.md). Work that treats each
example alone can run this way: frozen layers (BatchNorm on its moving statistics, no
gradient taken), evaluation, and the gradient of a phase whose BatchNorm layers all keep
their moving statistics, summed over the micro-batches. Batch statistics need every example
at once.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Input pixels a device takes at a time: the best measured micro-batch was 16 images at
# 96 px, 4 at 160 px and 2 at 224 px (100-150 thousand pixels), on a 32 MB L3 cache.
PIXELS = 2**17


def size(per_device_batch: int, pixels: int) -> int:
  """Examples a device takes at a time, of ``pixels`` pixels each: the largest divisor of
  ``per_device_batch`` within ``PIXELS`` (at least one). The whole batch off the CPU, where
  large batches run best."""
  if jax.default_backend() != "cpu":
    return per_device_batch
  most = min(per_device_batch, max(1, PIXELS // pixels))
  return max(d for d in range(1, most + 1) if per_device_batch % d == 0)


def map_examples(fn: Callable[[Any], tuple[Any, Any]], inputs: Any, *, shards: int,
                 pixels: int | None = None) -> tuple[Any, Any]:
  """``(rows, totals)``: ``fn`` over micro-batches of ``inputs``, for an ``fn`` that treats
  every example alone and returns rows ``[b, ...]`` (put back in their places) and totals
  (summed over the micro-batches).

  ``inputs`` is a pytree of ``[B, ...]`` arrays. Where it holds ``[B, H, W, C]`` maps, ``B``
  splits into ``shards`` equal blocks, one per device of the data axis (the result does not
  depend on it, the speed does), and each step of a ``lax.scan`` takes ``size(...)`` examples
  from every block, so that every device works on its own rows: examples of ``pixels`` pixels
  (the images the maps come from), by default those of the largest map. Without maps
  (pooled features) the whole batch runs at once.
  """
  leaves = jax.tree.leaves(inputs)
  batch = leaves[0].shape[0]
  maps = [x.shape[1] * x.shape[2] for x in leaves if x.ndim == 4]
  chunk = size(batch // shards, pixels or max(maps)) if maps else batch // shards
  steps = batch // shards // chunk
  if steps == 1:
    return fn(inputs)

  def split(x):  # [B, ...] -> [steps, shards * chunk, ...], block order kept within a step.
    x = x.reshape(shards, steps, chunk, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(steps, shards * chunk, *x.shape[3:])

  def join(y):  # The inverse of ``split``.
    y = y.reshape(steps, shards, chunk, *y.shape[2:]).swapaxes(0, 1)
    return y.reshape(batch, *y.shape[3:])

  parts = jax.tree.map(split, inputs)
  _, totals_shape = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], parts))

  def step(totals, part):
    rows, part_totals = fn(part)
    return jax.tree.map(jnp.add, totals, part_totals), rows

  totals, rows = jax.lax.scan(
      step, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), totals_shape), parts)
  return jax.tree.map(join, rows), totals


def apply(fn: Callable[[Any], Any], inputs: Any, *, shards: int,
          pixels: int | None = None) -> Any:
  """``fn(inputs)`` in micro-batches, for an ``fn`` that treats every example alone (see
  ``map_examples``)."""
  return map_examples(lambda x: (fn(x), ()), inputs, shards=shards, pixels=pixels)[0]


def accumulate(fn: Callable[[Any], Any], inputs: Any, *, shards: int,
               pixels: int | None = None) -> Any:
  """The sum over micro-batches of ``fn(micro-batch)``, for an ``fn`` summing what every
  example contributes alone (see ``map_examples``)."""
  return map_examples(lambda x: ((), fn(x)), inputs, shards=shards, pixels=pixels)[1]


def inference(model, variables: Any, inputs: Any, *, pixels: int | None = None,
              **apply_kwargs) -> Any:
  """``model.apply(variables, inputs, **apply_kwargs)`` in micro-batches over the model's
  ``batch_shards`` devices; the layers it runs must keep BatchNorm on its moving statistics."""
  return apply(lambda x: model.apply(variables, x, **apply_kwargs), inputs,
               shards=model.batch_shards, pixels=pixels)
