"""Frozen layers a few images at a time: on the CPU, inference runs faster in micro-batches.

Over a whole batch each layer writes its output to memory and the next layer reads it back
(block_1's expanded map alone is 126 MB at batch 32, 160x160). A few images at a time, a
layer's output is still in the cache when the next layer reads it: the base's forward pass at
batch 32 took 139 ms whole and 91 ms four images at a time at 160 px, 282 and 174 ms two at a
time at 224 px (benchmarks/README.md). Only layers whose output for an image depends on that
image alone can run this way: BatchNorm on its moving statistics, and no gradient taken.
"""

from collections.abc import Callable
from typing import Any

import jax

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


def apply(fn: Callable[[Any], Any], inputs: Any, *, shards: int) -> Any:
  """``fn(inputs)`` in micro-batches, for an ``fn`` that treats every example alone.

  ``inputs`` is a pytree of ``[B, ...]`` arrays, its pixels per example those of its largest
  ``[B, H, W, C]`` map. ``B`` splits into ``shards`` equal blocks, one per device of the data
  axis (the result does not depend on it, the speed does); each step of a ``lax.map`` takes
  ``size(...)`` examples from every block, so that every device works on its own rows.
  """
  leaves = jax.tree.leaves(inputs)
  batch = leaves[0].shape[0]
  chunk = size(batch // shards, max([x.shape[1] * x.shape[2] for x in leaves if x.ndim == 4],
                                    default=1))
  steps = batch // shards // chunk
  if steps == 1:
    return fn(inputs)

  def split(x):  # [B, ...] -> [steps, shards * chunk, ...], block order kept within a step.
    x = x.reshape(shards, steps, chunk, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(steps, shards * chunk, *x.shape[3:])

  def join(y):  # The inverse of ``split``.
    y = y.reshape(steps, shards, chunk, *y.shape[2:]).swapaxes(0, 1)
    return y.reshape(batch, *y.shape[3:])

  return jax.tree.map(join, jax.lax.map(fn, jax.tree.map(split, inputs)))


def inference(model, variables: Any, inputs: Any, **apply_kwargs) -> Any:
  """``model.apply(variables, inputs, **apply_kwargs)`` in micro-batches over the model's
  ``batch_shards`` devices; the layers it runs must keep BatchNorm on its moving statistics."""
  return apply(lambda x: model.apply(variables, x, **apply_kwargs), inputs,
               shards=model.batch_shards)
